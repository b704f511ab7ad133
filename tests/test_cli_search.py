"""`clipfind search | similar` end to end: a library made by `clipfind index`, asked through click."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from retrieval.errors import EXIT_FAILURE, EXIT_INPUT, EXIT_LIBRARY, EXIT_USAGE
from retrieval.media import synthetic
from tests.cli_runner import clipfind
from tests.pg_server import PASSWORD

PER_CLASS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, module_store):
    """Photos (one exact copy among them, two old files) indexed by the real `clipfind index`;
    on each store: with PostgreSQL, `index --db URL` once, then every command finds the database
    from the folder (and the password from $PGPASSWORD, as a user's shell would hold it)."""
    base = tmp_path_factory.mktemp("cli-search")
    photos = base / "photos"
    pairs = synthetic.write_collection(photos, per_class=PER_CLASS, seed=17)
    labels = {str(p): label for p, label in pairs}
    (photos / "copies").mkdir()
    original = str(photos / "red_circle" / "0000.jpg")
    shutil.copyfile(original, photos / "copies" / "same.jpg")
    labels[str(photos / "copies" / "same.jpg")] = "red circle"
    old = [str(photos / "blue_square" / "0001.jpg"), str(photos / "green_triangle" / "0002.jpg")]
    for path in old:
        os.utime(path, (946_000_000, 946_000_000))  # December 1999
    lib = base / "lib"
    db = ["--db", module_store] if module_store else []
    result = clipfind("index", photos, "-L", lib, *db, "--model-dir", tiny_model_dir, "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", PASSWORD)
        mp.delenv("CLIPFIND_DB", raising=False)
        yield {"lib": str(lib), "photos": photos, "labels": labels, "original": original, "old": old}


def lines(result) -> list[str]:
    return result.stdout.splitlines()


def json_results(result) -> list[dict]:
    return [json.loads(line) for line in lines(result)]


def test_table_is_the_default(setup):
    result = clipfind("search", "red circle", "-L", setup["lib"], "--no-server")
    assert result.exit_code == 0, result.output
    rows = lines(result)
    assert rows[0].split() == ["rank", "score", "relev", "size", "path"] and len(rows) == 11
    found = [setup["labels"][row.split(maxsplit=5)[5]] for row in rows[1:]]
    assert found.count("red circle") >= 5


def test_a_fresh_query_gives_its_onnx_session_the_free_cores(setup, monkeypatch):
    from retrieval import config
    from retrieval.model import onnx_session

    opened = []

    class Recorded(onnx_session.OnnxEncoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(onnx_session, "OnnxEncoder", Recorded)
    monkeypatch.setattr(config, "query_threads", lambda: 2)  # as on an idle 2-core machine
    result = clipfind("search", "a striped green thing", "-L", setup["lib"], "--no-server")
    assert result.exit_code == 0, result.output
    assert [e.loaded_towers for e in opened] == [["text"]]
    options = opened[0].session("text").get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level.name == "ORT_DISABLE_ALL"  # one query: load fast


def test_json_paths_and_nul_outputs_agree(setup):
    lib = setup["lib"]
    as_json = json_results(clipfind("search", "green square", "-L", lib, "--json", "-k", "7", "--no-server"))
    assert [r["rank"] for r in as_json] == list(range(1, 8))
    assert all(isinstance(r["score"], float) and r["size"] > 0 for r in as_json)
    paths = lines(clipfind("search", "green square", "-L", lib, "--paths", "-k", "7", "--no-server"))
    nul = clipfind("search", "green square", "-L", lib, "--null", "-k", "7", "--no-server").stdout_bytes
    assert paths == [r["path"] for r in as_json]
    assert nul.split(b"\0")[:-1] == [os.fsencode(p) for p in paths]
    result = clipfind("search", "x", "-L", lib, "--json", "--paths")
    assert result.exit_code == EXIT_USAGE and "choose one of" in result.output


def test_html_contact_sheet(setup, tmp_path):
    sheet = tmp_path / "sheet.html"
    result = clipfind("search", "yellow triangle", "-L", setup["lib"], "-k", "5", "--html", sheet, "--no-server")
    assert result.exit_code == 0 and "wrote a contact sheet of 5 images" in result.output
    assert sheet.read_text().count("data:image/jpeg;base64,") == 5
    assert len(lines(result)) == 6  # the table still goes to stdout


def test_image_queries_and_near_duplicates(setup, tmp_path):
    lib, original = setup["lib"], setup["original"]
    copy = str(setup["photos"] / "copies" / "same.jpg")
    top = json_results(clipfind("search", "--image", original, "-L", lib, "--json", "-k", "2", "--no-server"))
    assert {top[0]["path"], top[1]["path"]} == {original, copy} and top[1]["score"] == pytest.approx(1.0, abs=1e-5)

    similar = json_results(clipfind("similar", original, "-L", lib, "--json", "--min-score", "0.999", "--no-server"))
    assert [r["path"] for r in similar] == [copy]  # the file itself is left out, its copy is not

    outside = tmp_path / "query.png"
    synthetic.draw("blue circle", 128, __import__("random").Random(5)).save(outside)
    result = clipfind("search", "--image", outside, "-L", lib, "--json", "--no-server")
    found = [setup["labels"][r["path"]] for r in json_results(result)]
    assert found.count("blue circle") >= 4, found


def test_combinations_and_negatives(setup):
    lib, labels = setup["lib"], setup["labels"]

    def found(*args) -> list[str]:
        result = clipfind("search", *args, "-L", lib, "--json", "-k", "12", "--no-server")
        assert result.exit_code == 0, result.output
        return [labels[r["path"]] for r in json_results(result)]

    plain = found("circle")
    colour = max(synthetic.COLOURS, key=lambda c: plain.count(f"{c} circle"))
    assert found("circle", "--not", colour).count(f"{colour} circle") < plain.count(f"{colour} circle")
    mixed = found("red circle", "--image", setup["old"][0], "--weight", "2")  # a blue square, weighted up
    assert mixed.count("blue square") > found("red circle").count("blue square")
    assert found("red circle^3", "blue square").count("red circle") >= found("red circle", "blue square").count(
        "red circle")
    assert found("red circle", "--raw").count("red circle") >= 3
    assert found("red circle", "--template", "simple7").count("red circle") >= 3
    assert "normalise(sum_i w_i*p_i - L*sum_j n_j)" in " ".join(clipfind("search", "--help").output.split())


def test_filters(setup, monkeypatch):
    lib, photos = setup["lib"], setup["photos"]
    monkeypatch.chdir(photos)
    under = lines(clipfind("search", "circle", "-L", lib, "--paths", "-k", "100", "--path", "red_circle",
                           "--no-server"))
    assert len(under) == PER_CLASS and all(p.startswith(f"{photos}/red_circle/") for p in under)
    globbed = lines(clipfind("search", "circle", "-L", lib, "--paths", "-k", "100", "--path", "*/000[01].jpg",
                             "--no-server"))
    assert len(globbed) == 2 * len(synthetic.LABELS)
    old = lines(clipfind("search", "circle", "-L", lib, "--paths", "--before", "2000-01-01", "--no-server"))
    assert sorted(old) == sorted(setup["old"])
    assert setup["old"][0] not in lines(clipfind("search", "blue square", "-L", lib, "--paths", "-k", "100",
                                                 "--after", "2000-01-01", "--no-server"))
    tagged = clipfind("search", "circle", "-L", lib, "--tag", "nothing-has-this-tag", "--no-server")
    assert tagged.exit_code == 0 and tagged.stdout == "no results\n"
    assert clipfind("search", "x", "-L", lib, "--after", "last tuesday").exit_code == EXIT_USAGE


def test_template_file_is_read_where_the_command_runs(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("# my templates\na drawing of a {}.\nthere is a {} in the image.\n")
    result = clipfind("search", "green circle", "-L", setup["lib"], "--template", "mine.txt", "--json")
    assert result.exit_code == 0 and len(lines(result)) == 10
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    result = clipfind("search", "green circle", "-L", setup["lib"], "--template", "bad.txt")
    assert result.exit_code == EXIT_INPUT and "needs a {} placeholder" in result.output


def test_tag_filter_after_clipfind_tag(setup, tmp_path):
    """--tag reads what `clipfind tag` wrote: only images given that tag come back."""
    lib = tmp_path / "lib"
    shutil.copytree(setup["lib"], lib)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(synthetic.LABELS) + "\n")
    result = clipfind("tag", "-L", lib, "--labels", labels_file)
    assert result.exit_code == 0, result.output
    from retrieval.store.library import Library

    with Library.open(lib, create=False) as library, library.engine.connect() as conn:
        tagged = {row[0] for row in conn.exec_driver_sql(
            "SELECT path FROM images JOIN tags ON tags.image_id = images.id WHERE tags.label = 'red circle'")}
    found = lines(clipfind("search", "circle", "-L", lib, "--paths", "-k", "1000", "--tag", "red circle"))
    assert tagged and sorted(found) == sorted(tagged)


def test_bad_input_exit_codes(setup, tmp_path):
    lib = setup["lib"]
    cases = [
        (("search", "", "-L", lib), EXIT_INPUT, "empty query"),
        (("search", "-L", lib), EXIT_USAGE, "give a text"),
        (("search", "--image", tmp_path / "nope.jpg", "-L", lib), EXIT_INPUT, "cannot read query image"),
        (("search", "x", "-L", tmp_path / "no-library"), EXIT_LIBRARY, "no library at"),
        (("search", "x", "-L", lib, "-k", "0"), EXIT_USAGE, "-k"),
        (("similar", tmp_path / "nope.jpg", "-L", lib), EXIT_INPUT, "cannot read query image"),
    ]
    (tmp_path / "text.jpg").write_text("not a picture")
    cases.append((("search", "--image", tmp_path / "text.jpg", "-L", lib), EXIT_INPUT, "query image text.jpg"))
    for args, code, message in cases:
        result = clipfind(*args, "--no-server")
        assert result.exit_code == code and message in result.output, (args, result.output)
        if code != EXIT_USAGE:
            assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_empty_library_and_oversized_k(setup, tmp_path):
    from retrieval.store.library import Library

    with Library.open(setup["lib"], create=False) as full, Library.open(tmp_path / "empty") as empty:
        empty.set_meta("model", full.model_record)
    result = clipfind("search", "x", "-L", tmp_path / "empty", "--no-server")
    assert result.exit_code == EXIT_LIBRARY and "is empty: run `clipfind index" in result.output
    for args in (("reindex",), ("tag", "--labels", "cifar10"), ("search", "x", "--no-server")):
        for where in ("empty", "no-model"):  # rows missing, or even the model record
            Library.open(tmp_path / where).close()
            result = clipfind(*args, "-L", tmp_path / where)
            assert result.exit_code == EXIT_LIBRARY and "is empty" in result.output, (args, where, result.output)
    everything = lines(clipfind("search", "x", "-L", setup["lib"], "--paths", "-k", "100000", "--no-server"))
    assert len(everything) == len(setup["labels"])


def test_too_long_query_warns_and_answers(setup):
    result = clipfind("search", " ".join(["a big red circle next to a small green square"] * 3), "-L", setup["lib"],
                      "--paths", "-k", "3", "--no-server")
    assert result.exit_code == 0 and len(lines(result)) == 3
    assert "warning: query" in result.stderr and "cut off" in result.stderr


def test_random_weights_are_announced(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "open_clip_config.json").read_text())["model_cfg"]
    arch = tmp_path / "tiny-arch.json"
    arch.write_text(json.dumps(config))
    synthetic.write_collection(tmp_path / "photos", per_class=1, seed=3, labels=synthetic.LABELS[:3])
    lib = tmp_path / "lib"
    assert clipfind("index", tmp_path / "photos", "-L", lib, "--model", arch, "--random-weights",
                    "--workers", "0", "-q").exit_code == 0
    sheet = tmp_path / "sheet.html"
    result = clipfind("search", "red circle", "-L", lib, "--json", "--html", sheet, "--no-server")
    assert result.exit_code == 0 and len(lines(result)) == 3
    assert "RANDOM weights" in result.stderr and "RANDOM weights" in sheet.read_text()


def test_serve_on_a_port_in_use_is_one_line_error(setup):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = clipfind("serve", "--port", port, "-L", setup["lib"])
    assert result.exit_code == EXIT_FAILURE, result.output
    assert result.output.startswith("error: cannot listen on 127.0.0.1:") and len(result.output.splitlines()) == 1
