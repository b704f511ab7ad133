"""The pages in a real browser (Debian's chromium driven by Playwright) against a real server.

The tests of pages that read or write the library run on both stores (`store_page`: SQLite, and
a PostgreSQL library with the `postgres` mark); the one about URL rows reads objects, not the store.

Screenshots of every page land in tests/artifacts/screenshots/ (git-ignored; CI keeps them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retrieval.media import synthetic
from tests.test_render import CHROMIUM, _browser_or_skip
from tests.webapp import (  # noqa: F401 - fixtures
    TOKEN,
    XSS_NAME,
    pg_web_fixture,
    store_web_fixture,
    url_lib_fixture,
    url_web_fixture,
    web_fixture,
    web_lib_fixture,
)

SHOTS = Path(__file__).parent / "artifacts" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    sync_api = _browser_or_skip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def logged_in(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{server.url}/login?token={TOKEN}")  # sets the cookie, lands on the search page
    yield page
    context.close()
    assert not dialogs, f"a script ran from page content: {dialogs}"


@pytest.fixture
def page(browser, web):
    yield from logged_in(browser, web)


@pytest.fixture
def store_page(browser, store_web):
    """`page` on each store's server (`store_web`)."""
    yield from logged_in(browser, store_web)


def shot(server, name: str) -> str:
    """A screenshot's file: one per page and store."""
    return str(SHOTS / f"{name}{'-postgres' if server.state.library.store.is_postgres else ''}.png")


def photos_of(server) -> Path:
    return server.state.library.root.parent / "photos"


@pytest.fixture
def url_page(browser, url_web):
    yield from logged_in(browser, url_web)


def loaded_hits(page, selector: str = "#grid a.hit") -> list[dict]:
    page.wait_for_load_state("load")
    # Thumbnails load lazily as they scroll into view; load them all now to check every one.
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
    page.wait_for_function(f"""[...document.querySelectorAll('{selector} img')]
                               .every(i => i.complete)""")
    return page.eval_on_selector_all(selector, """els => els.map(a => ({
        id: +a.dataset.id, score: a.dataset.score === undefined ? null : +a.dataset.score,
        title: a.title, width: a.querySelector('img').naturalWidth}))""")


def test_search_shows_loaded_thumbnails_in_score_order(store_page, store_web):
    page, web = store_page, store_web
    page.fill("#q", "red circle")
    page.press("#q", "Enter")
    page.wait_for_url("**/?q=red+circle*")
    hits = loaded_hits(page)
    assert len(hits) >= 12 and all(h["width"] > 0 for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert "red_circle" in hits[0]["title"]
    page.locator("body").click(position={"x": 5, "y": 880})
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.id") == str(hits[1]["id"])
    page.screenshot(path=shot(web, "search"))
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/photo/{hits[1]['id']}*")


def test_upload_finds_the_same_photo_first(store_page, store_web):
    page = store_page
    target = next((photos_of(store_web) / "shapes" / "blue_square").glob("*.jpg"))
    page.set_input_files("#file", str(target))
    page.wait_for_url("**upload=*")
    hits = loaded_hits(page)
    assert hits[0]["title"] == str(target) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_photo_page_and_a_similar_photo(store_page, store_web):
    page, web = store_page, store_web
    page.goto(f"{web.url}/?q=yellow+square")
    first = loaded_hits(page)[0]
    page.click(f"#grid a.hit[data-id='{first['id']}']")
    page.wait_for_url(f"**/photo/{first['id']}*")
    assert page.inner_text("#path") == first["title"]
    assert page.eval_on_selector("img.large", "i => i.complete && i.naturalWidth > 0")
    similar = loaded_hits(page, "#similar a.hit")
    assert similar and all(s["id"] != first["id"] and s["width"] > 0 for s in similar)
    page.screenshot(path=shot(web, "photo"), full_page=True)
    page.click(f"#similar a.hit[data-id='{similar[0]['id']}']")
    page.wait_for_url(f"**/photo/{similar[0]['id']}*")
    page.click("#search-with")
    page.wait_for_url(f"**img={similar[0]['id']}*")
    assert loaded_hits(page)[0]["id"] == similar[0]["id"]


def test_tag_and_date_filters(store_page, store_web):
    page, web = store_page, store_web
    page.goto(f"{web.url}/?q=circle")
    everything = loaded_hits(page)
    page.select_option("#tag", "blue circle")
    page.click("aside.filters button[type=submit]")
    page.wait_for_url("**tag=blue+circle*")
    tagged = loaded_hits(page)
    assert tagged and len(tagged) < len(everything)
    with web.state.read() as conn:
        from retrieval.serve import catalog

        carrying = {row.id for row, _ in catalog.tagged(conn, "blue circle", 1000)}
    assert {h["id"] for h in tagged} <= carrying
    page.screenshot(path=shot(web, "filters"))
    page.goto(f"{web.url}/?q=circle")
    page.fill("input[name=before]", "2021-01-01")
    page.click("aside.filters button[type=submit]")
    page.wait_for_url("**before=2021-01-01*")
    dated = loaded_hits(page)
    assert dated and all("/red_" in h["title"] for h in dated)  # only red files are dated 2020


def test_tags_page_and_escaped_names(store_page, store_web):
    page, web = store_page, store_web
    page.goto(f"{web.url}/tags")
    assert "red circle" in page.inner_text("#tagcounts")
    page.screenshot(path=shot(web, "tags"))
    page.goto(f"{web.url}/?q=" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    page.goto(f"{web.url}/?q=yellow+triangle")
    xss = [h for h in loaded_hits(page) if XSS_NAME in h["title"]]
    assert xss, "the file with a script in its name is indexed"
    page.goto(f"{web.url}/photo/{xss[0]['id']}")
    assert page.inner_text("#path").endswith(XSS_NAME)  # shown as text; the fixture fails on any dialog


def test_index_run_from_the_status_page(store_page, store_web):
    page, web = store_page, store_web
    new_dir = photos_of(web) / "zz-new"
    pairs = synthetic.write_collection(new_dir, per_class=1, seed=99, labels=["green triangle"])
    page.goto(f"{web.url}/status")
    images = int(page.inner_text("#images"))
    assert page.input_value("input[name=folders]") == str(photos_of(web))
    page.click("form[data-job=index] button")
    page.wait_for_function("document.querySelector('#progress').textContent.includes('run')")
    page.screenshot(path=shot(web, "status-running"))
    page.wait_for_function("() => document.querySelector('#images') && "
                           f"+document.querySelector('#images').textContent === {images + 1}", timeout=240_000)
    recent = loaded_hits(page, "#recent a.hit")
    assert recent[0]["title"] == str(pairs[0][0]) and recent[0]["width"] > 0
    page.screenshot(path=shot(web, "status"), full_page=True)
    shutil.rmtree(new_dir)


def test_thumbnails_of_url_rows_load(url_page, url_web, url_lib):
    """Rows indexed from `file://`, `memory://` and `zip://...::file://` URLs: their thumbnails, read through fsspec."""
    page, (_, sources) = url_page, url_lib
    page.goto(f"{url_web.url}/?q=a+shape")
    hits = loaded_hits(page)
    by_url = [h for h in hits if h["title"] in sources]
    assert {h["title"].split(":", 1)[0] for h in by_url} == {"file", "memory", "zip"}
    assert all(h["width"] > 0 for h in hits), [h for h in hits if not h["width"]]
    memory = next(h for h in by_url if h["title"].startswith("memory:"))
    page.goto(f"{url_web.url}/photo/{memory['id']}")
    assert page.inner_text("#path") == memory["title"]
    assert page.eval_on_selector("img.large", "i => i.complete && i.naturalWidth > 0")
    page.screenshot(path=str(SHOTS / "photo-url.png"), full_page=True)
