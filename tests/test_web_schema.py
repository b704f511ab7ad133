"""Property-based requests generated from the app's own OpenAPI schema (schemathesis): no 500s.

Bounded (a few examples per operation) so it runs in well under a minute on
the shared 2-core machine. `/api/jobs` is left out: valid examples there start
index runs over whatever folder the generator names. (Driven through
hypothesis directly: schemathesis' pytest plugin does not load on this pytest.)
"""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.webapp import TOKEN, web_fixture, web_lib_fixture  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 15


def test_no_request_from_the_schema_makes_a_500(web):
    document = httpx.get(web.url + "/openapi.json", headers=AUTH, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document).exclude(path_regex="^/api/jobs")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search", "/similar", "/health", "/api/upload", "/thumb/{image_id}"}
    failures, calls = [], 0
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal calls
            calls += 1
            response = case.call(base_url=web.url, headers=AUTH, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.body, response.text[:300]))

        run()
    assert calls >= 5 * len(operations)
    assert not failures, failures[:5]
