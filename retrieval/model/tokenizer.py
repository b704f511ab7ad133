"""CLIP's byte-pair tokenizer without torch, for queries answered through ONNX Runtime.

open_clip's `SimpleTokenizer` imports torch at module level (it returns
tensors), which costs a fresh query process seconds and a gigabyte. This is
the same algorithm over the same merges file, returning numpy int64 arrays;
`tests/test_tokenizer.py` holds it to open_clip's output token for token.
The merges file is `bpe_simple_vocab_16e6.txt.gz`, shipped inside open_clip
and copied beside each exported text tower, so a query needs no open_clip.
"""

from __future__ import annotations

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


class BpeTokenizer:
    """Texts -> (n, context_length) int64 token ids, exactly as open_clip's SimpleTokenizer."""

    def __init__(self, vocab_file: str | Path | None = None, context_length: int = 77,
                 clean_mode: str = "lower") -> None:
        import regex

        if clean_mode not in CLEANERS:
            raise ValueError(f"unknown tokenizer clean mode {clean_mode!r}")
        lines = gzip.open(vocab_file or packaged_vocab()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]
        alphabet = sorted(_byte_alphabet())  # ids follow code points: printable bytes first
        vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), *SPECIAL]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.ids[SPECIAL[0]], self.ids[SPECIAL[1]]
        self.context_length = int(context_length)
        self.clean_mode = clean_mode
        self._words: dict[str, tuple[str, ...]] = {token: (token,) for token in SPECIAL}
        self._pattern = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                      regex.IGNORECASE)

    def _merge(self, word: str) -> tuple[str, ...]:
        """Apply the merges to one pre-token, lowest rank first, each over the whole word."""
        cached = self._words.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, MERGES), pair) for pair in zip(parts, parts[1:])]
            rank, (left, right) = min(ranked, key=lambda item: item[0])
            if rank == MERGES:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
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
            out.extend(self.ids[part] for part in self._merge(word))
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
