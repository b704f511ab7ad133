"""The warm query server: JSON API, token, text cache hits, and the CLI finding it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from retrieval import cli
from retrieval.errors import InputError
from retrieval.index.indexer import IndexOptions, index_paths
from retrieval.media import synthetic
from retrieval.model.encoder import ModelSpec
from retrieval.query.search import Searcher
from retrieval.query.types import Filters, Query
from retrieval.serve.client import (
    SERVE_FILE,
    ServerUnavailable,
    ask,
    call,
    find_server,
)
from retrieval.serve.runner import WebServer
from retrieval.serve.state import ServeState
from retrieval.store.library import Library


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("server")
    synthetic.write_collection(base / "photos", per_class=3, seed=23)
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(base / "lib", model=spec) as library:
        index_paths(library, [str(base / "photos")], spec, options=IndexOptions(workers=0))
    return base / "lib"


@pytest.fixture
def server(lib_dir):
    library = Library.open(lib_dir, create=False)
    srv = WebServer(ServeState(library, Searcher(library)), "127.0.0.1", 0).start_in_thread()
    srv.announce()
    yield srv
    srv.stop()
    srv.withdraw()
    library.close()


def info_of(srv) -> dict:
    return {"url": srv.url, "token": srv.token, "pid": os.getpid()}


def queries(srv) -> int:
    return srv.state.queries


def test_second_identical_query_is_answered_from_the_cache(server):
    info = info_of(server)
    body = {"query": Query.build("green circle").to_dict(), "k": 5}
    first, second = call(info, "/search", body), call(info, "/search", body)
    assert first["text_cache"] == {"hits": 0, "misses": 1}
    assert second["text_cache"] == {"hits": 1, "misses": 0}
    assert [r["path"] for r in second["results"]] == [r["path"] for r in first["results"]]
    assert len(first["results"]) == 5 and second["served_by"]["warm"] is True
    assert set(second["timings"]) >= {"encode", "faiss", "sql", "total"}
    assert second["timings"]["encode"] < first["timings"]["encode"]


def test_shorthand_get_similar_and_health(server, lib_dir):
    info = info_of(server)
    got = call(info, "/search?q=red+square&k=3")
    assert len(got["results"]) == 3 and got["query"] == '"red square"'
    short = call(info, "/search", {"text": "red square", "k": 3})
    assert [r["path"] for r in short["results"]] == [r["path"] for r in got["results"]]
    target = got["results"][0]["path"]
    similar = call(info, "/similar", {"path": target, "k": 4})
    assert len(similar["results"]) == 4 and target not in [r["path"] for r in similar["results"]]
    health = call(info, "/health")
    assert health["ok"] and health["library"] == str(lib_dir) and health["queries"] >= 3


def test_errors_keep_their_exit_codes_and_the_token_is_required(server):
    info = info_of(server)
    with pytest.raises(InputError, match="empty query"):
        call(info, "/search", {"text": " "})
    with pytest.raises(InputError, match="k must be an integer"):
        call(info, "/search", {"text": "x", "k": "many"})
    with pytest.raises(ServerUnavailable, match="404"):
        call(info, "/nowhere")
    with pytest.raises(ServerUnavailable, match="403"):
        call({**info, "token": "guess"}, "/health")
    request = urllib.request.Request(server.url + "/search", data=b"{not json",
                                     headers={"Authorization": f"Bearer {server.token}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and "not JSON" in json.loads(caught.value.read())["error"]
    assert call(info, "/health")["ok"]  # still serving


def test_remote_results_match_local_ones(server, lib_dir):
    query, filters = Query.build("yellow square", not_texts=["green"]), Filters(min_score=0.1)
    remote = ask(find_server(lib_dir), "search", query, filters, 6)
    with Library.open(lib_dir, create=False) as library:
        local = Searcher(library).search(query, 6, filters)
    assert [(r.image_id, r.path) for r in remote] == [(r.image_id, r.path) for r in local]
    assert [r.score for r in remote] == pytest.approx([r.score for r in local], abs=1e-5)


def test_cli_uses_the_announced_server(server, lib_dir):
    before = queries(server)
    result = CliRunner().invoke(cli.cli, ["search", "blue triangle", "-L", str(lib_dir), "--paths", "-k", "2"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2, result.output
    assert queries(server) == before + 1
    local = CliRunner().invoke(cli.cli, ["search", "blue triangle", "-L", str(lib_dir), "--paths", "-k", "2",
                                         "--no-server"])
    assert local.stdout == result.stdout and queries(server) == before + 1


def test_a_plain_search_is_answered_without_click_as_the_click_command_answers(server, lib_dir, capsysbinary):
    """`retrieval.cli.quick` (no click) gives the same bytes and exit codes as the click command."""
    from retrieval.cli import quick

    for fmt in ([], ["--json"], ["--paths"], ["-0"]):
        args = ["search", "blue triangle", "red^0.5", "-L", str(lib_dir), "-k", "3", "--server", *fmt]
        before = queries(server)
        assert quick.answer(list(args)) == 0
        fast = capsysbinary.readouterr().out
        slow = CliRunner().invoke(cli.cli, [*args, "--template", "photo"])  # a flag quick leaves to click
        assert slow.exit_code == 0 and fast == slow.stdout_bytes and len(fast) > 0, slow.output
        assert queries(server) == before + 2
    mistake = ["search", "  ", "-L", str(lib_dir)]  # the server refuses an empty text
    assert quick.answer(list(mistake)) == InputError.exit_code
    assert capsysbinary.readouterr().err == b"error: empty query text\n"
    assert CliRunner().invoke(cli.cli, [*mistake, "--template", "photo"]).exit_code == InputError.exit_code
    for args in (["search", "x", "--image", "a.jpg"], ["search", "--help"], ["search", "x", "-k", "0"],
                 ["search", "x", "--json", "--paths"], ["search", "-L", str(lib_dir)], ["search", "x", "-k"],
                 ["search", "-x", "-L", str(lib_dir)], ["status", "-L", str(lib_dir)]):
        assert quick.answer(list(args)) is None, args  # click's to parse, explain or refuse


def test_quick_search_falls_back_to_searching_here_when_the_server_does_not_answer(lib_dir, capsys):
    from retrieval.cli import quick

    (lib_dir / SERVE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": os.getpid(), "token": "t"}))
    try:
        args = ["search", "red circle", "-L", str(lib_dir)]
        assert quick.answer(args) is None and args[-1] == "--no-server"
        assert "did not answer" in capsys.readouterr().err
    finally:
        (lib_dir / SERVE_FILE).unlink()


def test_a_dead_server_is_ignored(lib_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (lib_dir / SERVE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": int(dead.stdout),
                                                 "token": "t"}))
    try:
        assert find_server(lib_dir) is None
        result = CliRunner().invoke(cli.cli, ["search", "red circle", "-L", str(lib_dir), "--paths", "-k", "1"])
        assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    finally:
        (lib_dir / SERVE_FILE).unlink()


def test_clipfind_serve_process(lib_dir):
    """The real command: listens on loopback, announces itself, answers, cleans up on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "-L", str(lib_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(cli.__file__)))
    try:
        line = proc.stdout.readline()
        assert line.startswith("clipfind serve: http://127.0.0.1:"), line + proc.stderr.read()
        login = proc.stdout.readline()
        assert login.startswith(f"open {line.split()[2]}/login?token="), login
        info = find_server(lib_dir)
        assert info is not None and info["pid"] == proc.pid and line.split()[2] == info["url"]
        assert oct(os.stat(lib_dir / SERVE_FILE).st_mode & 0o777) == "0o600"
        started = time.perf_counter()
        got = call(info, "/search", {"text": "red triangle", "k": 3})
        assert len(got["results"]) == 3 and time.perf_counter() - started < 5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not (lib_dir / SERVE_FILE).exists()
