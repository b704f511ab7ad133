"""CuPL descriptions: per-label sentences written by a language model.

CuPL ("Customized Prompts via Language models", Pratt et al. 2023) asks an
LLM several questions per class ("What does a {} look like?", ...), keeps
every answer as a prompt, and ensembles their embeddings into the class
vector. This module reads and checks such files (`{label: [sentence, ...]}`)
and writes them by asking any OpenAI-compatible `/v1/chat/completions`
endpoint.

Every answered question is appended to a JSONL cache (flushed and fsynced)
before the next is asked, so a run that is killed or loses its server picks
up where it stopped: answered questions are never asked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ClipfindError, InputError

# The question phrasings CuPL uses for general object classes (ImageNet).
QUESTIONS = (
    "Describe what a {} looks like.",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}.",
    "A caption of an image of a {}:",
)
SYSTEM_PROMPT = "Answer in one short, visual sentence."


class EndpointError(ClipfindError):
    """The LLM endpoint is unreachable, too slow, or does not speak chat/completions."""


# Descriptions shipped with the package, by name (`cupl:cifar10`, `--descriptions cifar10`).
# They are hand-written (no language model runs offline); each file says so in its "_source".
BUNDLED = {"cifar10": "cifar10_cupl.json"}


def bundled_path(name: str) -> Path:
    """The package-data file of a bundled set (templates or descriptions)."""
    return Path(__file__).resolve().parent / "data" / name


# -- reading -------------------------------------------------------------------------
def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """A CuPL descriptions file or bundled set name, checked: a JSON object of label -> non-empty
    list of strings (keys starting with `_` are notes about the file, not labels)."""
    if str(path) in BUNDLED and not Path(path).exists():
        path = bundled_path(BUNDLED[str(path)])
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read descriptions file {path} (bundled sets: {', '.join(BUNDLED)}): "
                         f"{exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"descriptions file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except RecursionError:  # found by the fuzz suite: `[[[[...` deeper than Python's stack
        raise InputError(f"descriptions file {path} nests too deeply to be a descriptions file") from None
    return validate_descriptions(doc, str(path))


def validate_descriptions(doc: object, source: str = "descriptions") -> dict[str, list[str]]:
    if not isinstance(doc, dict):
        raise InputError(f"{source}: expected a JSON object {{label: [sentences]}}, got {type(doc).__name__}")
    out: dict[str, list[str]] = {}
    for label, sentences in doc.items():
        if label.startswith("_"):
            continue
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise InputError(f"{source}: the value for {label!r} must be a list of sentences")
        cleaned = [" ".join(s.split()) for s in sentences if s.strip()]
        if not cleaned:
            raise InputError(f"{source}: label {label!r} has no sentences")
        out[" ".join(label.split())] = cleaned
    if not out:
        raise InputError(f"{source} has no labels")
    return out


def descriptions_for(descriptions: dict[str, list[str]], names: Sequence[str]) -> list[str]:
    """Sentences for a label, found under its name or any synonym (case-insensitive)."""
    folded = {k.casefold(): v for k, v in descriptions.items()}
    out: list[str] = []
    for name in names:
        out.extend(folded.get(name.casefold(), []))
    return out


# -- asking ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatClient:
    """A minimal OpenAI-compatible chat/completions client on the standard library."""

    api_base: str
    model: str
    api_key: str | None = None
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    temperature: float = 0.99
    max_tokens: int = 60

    @property
    def url(self) -> str:
        base = self.api_base.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def ask(self, question: str, n: int) -> list[str]:
        """`n` sampled answers to one question (fewer if the server ignores `n`)."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": question}],
            "n": n,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last: EndpointError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4))
            try:
                return _parse_answers(self._post(body), self.url)
            except _Retryable as exc:
                last = EndpointError(f"{exc} (after {attempt + 1} tries)")
        assert last is not None
        raise last

    def _post(self, body: dict) -> bytes:
        # urllib.request brings http.client, email and ssl, an import every text query paid
        # (prompts imports this module) for a call only `clipfind prompts generate` makes.
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            if exc.code in (408, 409, 425, 429) or exc.code >= 500:
                raise _Retryable(f"the LLM endpoint {self.url} answered HTTP {exc.code}") from exc
            raise EndpointError(f"the LLM endpoint {self.url} refused the request: HTTP {exc.code} {detail[:200]}") from exc
        except TimeoutError as exc:
            raise _Retryable(f"the LLM endpoint {self.url} did not answer within {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"the LLM endpoint {self.url} did not answer within {self.timeout:g} s") from exc
            raise _Retryable(f"no LLM endpoint reachable at {self.url} ({reason}); start one or pass --api-base") from exc
        except (ConnectionError, OSError) as exc:  # reset or closed mid-answer
            raise _Retryable(f"the LLM endpoint {self.url} dropped the connection ({exc})") from exc


class _Retryable(Exception):
    pass


def _parse_answers(raw: bytes, url: str) -> list[str]:
    """The message contents of a chat/completions response; garbage is retried, then an error."""
    try:
        doc = json.loads(raw)
        choices = doc["choices"]
        texts = [c["message"]["content"] for c in choices]
    except (ValueError, KeyError, TypeError) as exc:
        snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
        raise _Retryable(f"the LLM endpoint {url} did not return a chat/completions answer (got {snippet!r})") from exc
    answers = [" ".join(t.split()) for t in texts if isinstance(t, str) and t.strip()]
    return answers


# -- the cache -------------------------------------------------------------------------
def question_key(model: str, question: str, n: int, temperature: float, max_tokens: int) -> str:
    blob = json.dumps([model, question, n, temperature, max_tokens, SYSTEM_PROMPT])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class AnswerCache:
    """Append-only JSONL of answered questions; a torn last line (killed mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, list[str]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = list(entry["answers"])
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> list[str] | None:
        return self.answers.get(key)

    def put(self, key: str, question: str, answers: list[str]) -> None:
        self.answers[key] = answers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "question": question, "answers": answers}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            if fh.tell() and not self._ends_with_newline():
                fh.write("\n")  # seal a line torn by an earlier kill
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"


def default_cache_path(out: Path) -> Path:
    return out.with_name(out.name + ".cache.jsonl")


def generate(
    labels: Sequence[str],
    client: ChatClient,
    out: str | Path,
    per_question: int = 5,
    questions: Sequence[str] = QUESTIONS,
    cache_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Ask every question for every label, write `{label: [sentences]}` atomically to `out`.

    Returns stats: questions asked, answered from cache, labels written.
    """
    out = Path(out).expanduser()
    cache = AnswerCache(Path(cache_path) if cache_path else default_cache_path(out))
    descriptions: dict[str, list[str]] = {}
    asked = cached = 0
    for label in labels:
        sentences: list[str] = []
        for template in questions:
            question = template.format(label)
            key = question_key(client.model, question, per_question, client.temperature, client.max_tokens)
            answers = cache.get(key)
            if answers is None:
                answers = client.ask(question, per_question)
                cache.put(key, question, answers)
                asked += 1
            else:
                cached += 1
            sentences.extend(a for a in answers if a not in sentences)
            if progress:
                progress(1)
        if sentences:
            descriptions[label] = sentences
    empty = [label for label in labels if label not in descriptions]
    if not descriptions:
        raise EndpointError(f"the LLM endpoint {client.url} gave no usable answers for any label")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(descriptions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return {"labels": len(descriptions), "questions_asked": asked, "answered_from_cache": cached,
            "labels_without_answers": empty, "out": str(out), "cache": str(cache.path)}
