"""CLIP's byte-pair tokenizer without torch, for queries answered through ONNX Runtime.

open_clip's `SimpleTokenizer` imports torch at module level (it returns
tensors), which costs a fresh query process seconds and a gigabyte. This is
the same algorithm over the same merges file, returning numpy int64 arrays;
`tests/test_tokenizer.py` holds it to open_clip's output token for token.
The merges file is `bpe_simple_vocab_16e6.txt.gz`, shipped inside open_clip
and copied beside each exported text tower, so a query needs no open_clip.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import html
import importlib.util
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # open_clip/OpenAI CLIP use the first 48,894 merges of the file
SPECIAL = ("<start_of_text>", "<end_of_text>")
CLEANERS = ("lower", "whitespace", "canonicalize")


def packaged_vocab() -> Path:
    """open_clip's copy of the merges file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed, and its BPE vocabulary is needed")
    return Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """Byte b -> a printable unicode character (GPT-2's reversible byte-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return tuple(chr(table[b]) for b in range(256))


def _fix(text: str) -> str:
    if text.isascii() and text.isprintable() and "&" not in text:
        # ftfy and the HTML unescapes change nothing here (ftfy fixes mojibake, non-ASCII
        # quotes and widths, control characters, line breaks and entities): skipping its
        # import saves a query process 7 MB and ~0.1 s. tests/test_tokenizer.py checks it.
        return text.strip()
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _squeeze(text: str) -> str:
    return " ".join(text.split()).strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean(text: str, mode: str = "lower") -> str:
    """open_clip's text cleaning: ftfy, double HTML unescape, then its `clean` mode."""
    if mode == "lower":
        return _squeeze(_fix(text)).lower()
    if mode == "whitespace":
        return _squeeze(_fix(text))
    if mode == "canonicalize":
        return _squeeze(_fix(text).replace("_", " ").translate(_PUNCTUATION).lower())
    raise ValueError(f"unknown tokenizer clean mode {mode!r} (known: {', '.join(CLEANERS)})")


TABLES_VERSION = 1


def _build_tables(vocab_file: Path) -> dict[str, np.ndarray]:
    """The merges as int arrays: sorted pair keys (left id << 16 | right id), their ranks, the
    id each rank makes (open_clip looks the joined string up), and the start/end ids."""
    text = gzip.open(vocab_file).read().decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n", MERGES + 1)[1:MERGES + 1]]
    alphabet = sorted(_byte_alphabet())  # ids follow code points: printable bytes first
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), *SPECIAL]
    ids = {token: i for i, token in enumerate(vocab)}
    if any(ids[c] != i or ids[c + "</w>"] != 256 + i for i, c in enumerate(alphabet)):
        raise ValueError(f"{vocab_file} is not a CLIP BPE vocabulary")
    ranks = {ids[left] << 16 | ids[right]: i for i, (left, right) in enumerate(merges)}  # last wins
    keys = np.fromiter(ranks, np.int64, len(ranks))
    order = np.argsort(keys)
    return {"keys": keys[order], "ranks": np.fromiter(ranks.values(), np.int32, len(ranks))[order],
            "made": np.array([ids[left + right] for left, right in merges], np.int32),
            "special": np.array([ids[SPECIAL[0]], ids[SPECIAL[1]]], np.int64)}


def load_tables(vocab_file: str | Path) -> dict[str, np.ndarray]:
    """`_build_tables`, kept in $CLIPFIND_CACHE/tokenizer/ after the first time.

    Building them makes ~100,000 short-lived strings whose memory Python keeps
    (17 MB of a fresh text query's peak RSS); loading the arrays costs 1 MB.
    A cache that cannot be written or read is skipped, never an error.
    """
    import hashlib
    import os
    import tempfile

    from retrieval.config import cache_root

    vocab_file = Path(vocab_file)
    data = vocab_file.read_bytes()
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    cached = cache_root() / "tokenizer" / f"bpe-{digest}-v{TABLES_VERSION}-{MERGES}.npz"
    try:
        with np.load(cached) as saved:
            return {name: saved[name] for name in ("keys", "ranks", "made", "special")}
    except Exception:  # noqa: BLE001 - missing, truncated (BadZipFile), damaged: build again
        pass
    tables = _build_tables(vocab_file)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=cached.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **tables)
            os.replace(tmp, cached)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass
    return tables


class BpeTokenizer:
    """Texts -> (n, context_length) int64 token ids, exactly as open_clip's SimpleTokenizer."""

    def __init__(self, vocab_file: str | Path | None = None, context_length: int = 77,
                 clean_mode: str = "lower") -> None:
        import regex

        if clean_mode not in CLEANERS:
            raise ValueError(f"unknown tokenizer clean mode {clean_mode!r}")
        tables = load_tables(vocab_file or packaged_vocab())
        self.keys, self.ranks, self.made = tables["keys"], tables["ranks"], tables["made"]
        self.sot, self.eot = (int(i) for i in tables["special"])
        alphabet = sorted(_byte_alphabet())
        self.byte_ids = {c: i for i, c in enumerate(alphabet)}
        self.end_ids = {c: 256 + i for i, c in enumerate(alphabet)}
        self.context_length = int(context_length)
        self.clean_mode = clean_mode
        self._words: dict[str, tuple[int, ...]] = {SPECIAL[0]: (self.sot,), SPECIAL[1]: (self.eot,)}
        self._pattern = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                      regex.IGNORECASE)

    def _rank_of_pairs(self, parts: list[int]) -> np.ndarray:
        pairs = np.array(parts[:-1], np.int64) << 16 | np.array(parts[1:], np.int64)
        at = np.minimum(np.searchsorted(self.keys, pairs), len(self.keys) - 1)
        return np.where(self.keys[at] == pairs, self.ranks[at], MERGES)

    def _merge(self, word: str) -> tuple[int, ...]:
        """Apply the merges to one pre-token, lowest rank first, each over the whole word; its ids."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        parts = [*(self.byte_ids[c] for c in word[:-1]), self.end_ids[word[-1]]]
        while len(parts) > 1:
            ranks = self._rank_of_pairs(parts)
            first = int(ranks.argmin())
            rank = int(ranks[first])
            if rank == MERGES:
                break
            left, right, made = parts[first], parts[first + 1], int(self.made[rank])
            merged: list[int] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    merged.append(made)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        if len(self._words) < 100_000:
            self._words[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        alphabet = _byte_alphabet()
        out: list[int] = []
        for piece in self._pattern.findall(clean(text, self.clean_mode)):
            word = "".join(alphabet[b] for b in piece.encode("utf-8"))
            out.extend(self._merge(word))
        return out

    def token_count(self, text: str) -> int:
        """Tokens the text needs including start and end: above context_length it is cut off."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[:self.context_length]
                tokens[-1] = self.eot
            out[row, :len(tokens)] = tokens
        return out
