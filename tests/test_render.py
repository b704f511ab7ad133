"""Output formats: they parse, they pipe, and the contact sheet opens in a real browser."""

from __future__ import annotations

import io
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from retrieval.media import synthetic
from retrieval.query import render
from retrieval.query.types import SearchResponse, SearchResult

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def files(tmp_path) -> list[str]:
    pairs = synthetic.write_collection(tmp_path / "photos", per_class=2, seed=9, labels=synthetic.LABELS[:3])
    paths = [str(p) for p, _ in pairs]
    odd = os.path.join(os.fsencode(tmp_path / "photos").decode(), os.fsdecode(b"caf\xe9 \n.jpg"))
    os.rename(paths[-1], odd)  # not UTF-8, with a newline: only NUL separation keeps it whole
    return paths[:-1] + [odd]


def response_for(paths: list[str], **extra) -> SearchResponse:
    results = [SearchResult(rank=i + 1, score=0.9 - i * 0.05, image_id=100 + i, path=p,
                            size=os.path.getsize(p) if os.path.exists(p) else 0, width=128, height=128,
                            taken_at=datetime(2024, 5, 1, 12, 30) if i == 0 else None)
               for i, p in enumerate(paths)]
    return SearchResponse(results=results, query='"red circle" − 0.5×"people"', model="tiny test model",
                          library_size=42, **extra)


def rendered(response: SearchResponse, fmt: str) -> bytes:
    out = io.BytesIO()
    render.write_output(response, fmt, out)
    return out.getvalue()


def test_json_lines_parse_and_round_trip(files):
    response = response_for(files)
    lines = rendered(response, "json").decode("utf-8").splitlines()
    assert len(lines) == len(files)
    objects = [json.loads(line) for line in lines]
    assert [o["rank"] for o in objects] == list(range(1, len(files) + 1))
    assert objects[0]["taken_at"] == "2024-05-01T12:30:00" and objects[0]["score"] == pytest.approx(0.9)
    assert set(objects[0]) >= {"rank", "score", "image_id", "path", "size", "width", "height", "taken_at"}
    assert "\\xe9" in objects[-1]["path"] and "path_b64" in objects[-1]  # shown, and kept exactly
    assert [SearchResult.from_dict(o) for o in objects] == [
        SearchResult(**{**r.__dict__, "score": round(r.score, 6)}) for r in response.results]


def test_nul_separated_paths_split_exactly(files):
    data = rendered(response_for(files), "paths0")
    assert data.endswith(b"\0")
    assert data.split(b"\0")[:-1] == [os.fsencode(p) for p in files]
    assert all(os.path.exists(os.fsdecode(p)) for p in data.split(b"\0")[:-1])


def test_newline_paths_and_table(files):
    plain = files[:-1]  # the newline in the odd name is exactly why --paths0 exists
    assert rendered(response_for(plain), "paths").decode().splitlines() == plain
    table = rendered(response_for(files), "table").decode("utf-8")
    header, first = table.splitlines()[:2]
    assert header.split() == ["rank", "score", "relev", "size", "path"]
    assert first.split()[:2] == ["1", "0.9000"] and first.endswith(files[0])
    assert rendered(response_for([]), "table") == b"no results\n"


def test_human_size():
    assert [render.human_size(n) for n in (0, 999, 2048, 5 * 1024**2, 3 * 1024**3)] == [
        "0 B", "999 B", "2.0 KB", "5.0 MB", "3.0 GB"]


def test_html_is_self_contained_and_escaped(files, tmp_path):
    missing = str(tmp_path / "gone <b>.jpg")
    response = response_for(files + [missing], warnings=["using ViT-B-32 with RANDOM weights"])
    page = render.write_html(response, tmp_path / "sheet.html").read_text("utf-8")
    assert page.count('src="data:image/jpeg;base64,') == len(files)
    assert "gone &lt;b&gt;.jpg" in page and "<b>.jpg" not in page
    assert "RANDOM weights" in page and "&quot;red circle&quot;" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CLIPFIND_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and CLIPFIND_REQUIRE_BROWSER=1")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api")


def test_contact_sheet_shows_every_thumbnail_in_a_real_browser(files, tmp_path):
    sync_api = _browser_or_skip()
    response = response_for(files + [str(tmp_path / "vanished.jpg")])
    sheet = render.write_html(response, tmp_path / "sheet.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(Path(sheet).as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "figure.hit img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
            figures = page.eval_on_selector_all(
                "figure.hit", "els => els.map(e => [e.dataset.rank, e.querySelector('.score').textContent])")
            missing = page.inner_text("figure.hit:last-child .missing")
            title = page.title()
        finally:
            browser.close()
    assert len(images) == len(files)
    assert all(done and width > 0 and height > 0 for done, width, height in images), images
    assert figures == [[str(r.rank), f"{r.score:.4f}"] for r in response.results]
    assert "cannot show" in missing and title.startswith("clipfind: ")
