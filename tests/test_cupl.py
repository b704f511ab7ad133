"""CuPL descriptions: file checks, and `prompts generate` against a real chat/completions server.

The servers here are real HTTP servers on 127.0.0.1 started in a thread per
test; nothing in the client is patched. Their behaviour (answer, hang, send
garbage, fail, die after N answers) is set per test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from retrieval.errors import InputError
from retrieval.prompting import cupl

LABELS = ["red circle", "blue square", "green triangle"]
N_QUESTIONS = len(LABELS) * len(cupl.QUESTIONS)


class ChatServer:
    """A loopback OpenAI-style server; `mode` decides how it treats each request."""

    def __init__(self, mode: str = "ok", answer_limit: int | None = None) -> None:
        self.mode, self.answer_limit = mode, answer_limit
        self.questions: list[str] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                server.headers.append(dict(self.headers))
                server.questions.append(question)
                mode = server.mode
                if server.answer_limit is not None and len(server.questions) > server.answer_limit:
                    mode = "hang"
                if mode == "hang":
                    server.release.wait(30)
                    return
                if mode == "garbage":
                    return self._send(200, b"<html>not an API</html>")
                if mode == "flaky" and len(server.questions) % 2 == 1:
                    return self._send(500, b'{"error": "overloaded"}')
                if mode == "no_choices":
                    return self._send(200, json.dumps({"object": "chat.completion"}).encode())
                choices = [{"index": i, "message": {"role": "assistant",
                                                    "content": f" Answer {i} to:\n {question} "}}
                           for i in range(body.get("n", 1))]
                self._send(200, json.dumps({"object": "chat.completion", "choices": choices}).encode())

            def _send(self, code: int, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def client(base: str, **kw) -> cupl.ChatClient:
    return cupl.ChatClient(base, "test-llm", **{"timeout": 2.0, "retries": 1, "backoff": 0.0, **kw})


# -- descriptions files ----------------------------------------------------------------------
def test_load_descriptions_checks_shape(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps({"red  circle": ["A round red  disc.", " "], "cat": "a small cat"}))
    assert cupl.load_descriptions(good) == {"red circle": ["A round red disc."], "cat": ["a small cat"]}
    cases = {
        '{"a": ["x"],': "not valid JSON (line 1",
        '["x"]': "expected a JSON object",
        '{"a": [1, 2]}': "must be a list of sentences",
        '{"a": ["  "]}': "has no sentences",
        "{}": "has no labels",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            cupl.load_descriptions(bad)
    with pytest.raises(InputError, match="cannot read"):
        cupl.load_descriptions(tmp_path / "missing.json")


def test_descriptions_found_under_synonyms_case_insensitively():
    desc = {"Kitty": ["a"], "cat": ["b"]}
    assert cupl.descriptions_for(desc, ("cat", "kitty")) == ["b", "a"]
    assert cupl.descriptions_for(desc, ("dog",)) == []


# -- generate ----------------------------------------------------------------------------------
def test_generate_asks_every_question_and_writes_the_file(tmp_path):
    out = tmp_path / "desc.json"
    with ChatServer() as server:
        stats = cupl.generate(LABELS, client(server.base, api_key="sekrit"), out, per_question=3)
    assert stats["questions_asked"] == N_QUESTIONS and stats["answered_from_cache"] == 0
    assert sorted(server.questions) == sorted(q.format(lab) for lab in LABELS for q in cupl.QUESTIONS)
    assert all(h["Authorization"] == "Bearer sekrit" for h in server.headers)
    doc = cupl.load_descriptions(out)
    assert list(doc) == LABELS
    assert len(doc["red circle"]) == 3 * len(cupl.QUESTIONS)
    assert doc["red circle"][:2] == ["Answer 0 to: Describe what a red circle looks like.",
                                     "Answer 1 to: Describe what a red circle looks like."]
    # A second run asks nothing: everything is in the cache.
    with ChatServer() as server:
        again = cupl.generate(LABELS, client(server.base), out, per_question=3)
    assert server.questions == [] and again["answered_from_cache"] == N_QUESTIONS


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    with ChatServer() as server:
        base = server.base  # a port that was just free and is closed again
    with pytest.raises(cupl.EndpointError, match=r"no LLM endpoint reachable at http://127\.0\.0\.1"):
        cupl.generate(LABELS, client(base), tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_hanging_endpoint_times_out(tmp_path):
    with ChatServer("hang") as server:
        started = time.monotonic()
        with pytest.raises(cupl.EndpointError, match=r"did not answer within 0\.3 s \(after 2 tries\)"):
            cupl.generate(LABELS, client(server.base, timeout=0.3), tmp_path / "d.json")
        assert time.monotonic() - started < 5
        assert len(server.questions) == 2  # one try + one retry, then a clear stop


@pytest.mark.parametrize("mode", ["garbage", "no_choices"])
def test_garbage_answers_are_an_error_not_a_file(tmp_path, mode):
    with ChatServer(mode) as server:
        with pytest.raises(cupl.EndpointError, match="did not return a chat/completions answer"):
            cupl.generate(LABELS, client(server.base), tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_server_errors_are_retried_with_backoff(tmp_path):
    with ChatServer("flaky") as server:
        stats = cupl.generate(LABELS[:1], client(server.base, retries=2, backoff=0.01), tmp_path / "d.json")
    assert stats["questions_asked"] == len(cupl.QUESTIONS)
    assert len(server.questions) == 2 * len(cupl.QUESTIONS)  # each question failed once, then answered


def test_server_dying_mid_run_resumes_from_the_cache(tmp_path):
    out = tmp_path / "d.json"
    with ChatServer(answer_limit=4) as server:
        with pytest.raises(cupl.EndpointError):
            cupl.generate(LABELS, client(server.base, timeout=0.3, retries=0), out)
    assert not out.exists()
    with ChatServer() as server:
        stats = cupl.generate(LABELS, client(server.base), out)
    assert stats["answered_from_cache"] == 4 and stats["questions_asked"] == N_QUESTIONS - 4
    assert len(server.questions) == N_QUESTIONS - 4
    assert len(cupl.load_descriptions(out)) == len(LABELS)


def test_killed_process_resumes_without_re_asking(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "retrieval.cli", "prompts", "generate", "--labels", str(labels), "--out", str(out),
           "--model", "test-llm", "--timeout", "60", "-q"]
    with ChatServer(answer_limit=6) as server:
        proc = subprocess.Popen(cmd + ["--api-base", server.base], cwd=Path(__file__).parents[1],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(server.questions) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # stuck waiting on question 7: no chance to clean up
        proc.wait(10)
    assert len(server.questions) == 7 and not out.exists()
    with ChatServer() as server:
        done = subprocess.run(cmd + ["--api-base", server.base, "--json"], cwd=Path(__file__).parents[1],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["answered_from_cache"] == 6 and stats["questions_asked"] == N_QUESTIONS - 6
    assert len(server.questions) == N_QUESTIONS - 6
    assert len(cupl.load_descriptions(out)) == len(LABELS)


def test_cache_survives_a_torn_last_line(tmp_path):
    cache = cupl.AnswerCache(tmp_path / "c.jsonl")
    cache.put("k1", "q1", ["a"])
    with open(tmp_path / "c.jsonl", "a") as fh:
        fh.write('{"key": "k2", "answ')  # killed mid-write
    reread = cupl.AnswerCache(tmp_path / "c.jsonl")
    assert reread.answers == {"k1": ["a"]}
    reread.put("k3", "q3", ["b"])
    assert cupl.AnswerCache(tmp_path / "c.jsonl").answers == {"k1": ["a"], "k3": ["b"]}


def test_bundled_cifar10_descriptions_are_hand_written_cupl():
    described = cupl.load_descriptions("cifar10")
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert sorted(described) == cifar10  # the "_source" note is not a label
    assert all(10 <= len(sentences) <= 20 and len(set(sentences)) == len(sentences)
               for sentences in described.values())
    raw = json.loads(cupl.bundled_path(cupl.BUNDLED["cifar10"]).read_text())
    assert "HAND-WRITTEN" in raw["_source"] and "not generated by a language model" in raw["_source"]


def test_a_name_that_is_neither_file_nor_bundled_set_says_which_sets_exist(tmp_path):
    with pytest.raises(InputError, match="bundled sets: cifar10"):
        cupl.load_descriptions(tmp_path / "nope.json")
