"""The torch-free tokenizer gives open_clip's SimpleTokenizer's ids, token for token."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from retrieval.model.tokenizer import BpeTokenizer, packaged_vocab

WORDS = ["a", "photo", "of", "the", "red", "circle", "dog", "beach", "sunset", "cat's", "we're",
         "naïve", "café", "Zürich", "東京", "猫", "кошка", "σκύλος", "🐶", "🏖️", "👩‍👩‍👧", "&amp;",
         "&lt;b&gt;", "<start_of_text>", "<END_OF_TEXT>", "1999", "3.14", "--", "!!!", "hello_world",
         "don't", "I'LL", "x²", "ﬁne", "Ａｂｃ", "\u200b", "\t", "e\u0301", "l'été", "😀😀😀"]
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
          (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F300, 0x1F6FF),
          (0x2000, 0x206F), (0xFF00, 0xFFEF)]


def varied_texts(count: int, seed: int = 17) -> list[str]:
    """Phrases, random code points from many scripts, emoji, very long and empty strings."""
    rng = random.Random(seed)
    texts = ["", " ", "   \n\t ", "a", "A PHOTO OF A DOG.", "word " * 200, "🐶" * 100,
             "supercalifragilisticexpialidocious" * 5, "&amp;amp;", "<start_of_text> hi <end_of_text>"]
    while len(texts) < count:
        kind = rng.random()
        if kind < 0.4:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        elif kind < 0.8:
            lo, hi = rng.choice(RANGES)
            texts.append("".join(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else " "
                                 for _ in range(rng.randint(1, 30))))
        else:
            parts = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
            texts.append("".join(p + rng.choice([" ", "", ",", "  ", "\n"]) for p in parts))
    return texts


@pytest.fixture(scope="module")
def reference():
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer


@pytest.mark.parametrize("context, mode", [(77, "lower"), (16, "lower"), (77, "whitespace"),
                                           (32, "canonicalize")])
def test_ids_match_open_clip(reference, context, mode):
    texts = varied_texts(3000 if (context, mode) == (77, "lower") else 600)
    ours = BpeTokenizer(context_length=context, clean_mode=mode)
    theirs = reference.SimpleTokenizer(context_length=context, clean=mode)
    expected = theirs(texts).numpy()
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == expected.shape
    differing = [texts[i] for i in np.nonzero((got != expected).any(axis=1))[0]]
    assert not differing, f"{len(differing)} texts differ, first: {differing[0]!r}"
    for text in texts[:300]:  # untruncated counts drive the "query was cut off" warning
        assert ours.token_count(text) == len(theirs.encode(text)) + 2


def test_truncation_keeps_the_end_token():
    ours = BpeTokenizer(context_length=8)
    row = ours("one two three four five six seven eight nine ten")[0]
    assert row[0] == ours.sot and row[-1] == ours.eot and (row != 0).all()


def test_imports_no_torch():
    code = ("import sys; from retrieval.model.tokenizer import BpeTokenizer; BpeTokenizer()(['a dog']); "
            "print('torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_vocab_file_ships_with_open_clip():
    assert packaged_vocab().is_file()


def test_printable_ascii_skips_ftfy_without_changing_the_text():
    """`clean` skips ftfy for printable ASCII without '&' (a query then never imports it):
    ftfy and the double unescape must leave such text unchanged."""
    import html

    import ftfy

    from retrieval.model.tokenizer import clean

    rng = random.Random(3)
    printable = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    texts = ["  a photo of a dog.  ", "it's `quoted' \"twice\"", "<b>bold</b> #1 ~50% off!", "a;b",
             *("".join(rng.choice(printable) for _ in range(rng.randint(1, 60))) for _ in range(3000))]
    for text in texts:  # what the skipped path would have given: the text, stripped
        assert html.unescape(html.unescape(ftfy.fix_text(text))).strip() == text.strip()
        assert clean(text, "whitespace") == " ".join(text.split())
    out = subprocess.run([sys.executable, "-c", "import sys; from retrieval.model.tokenizer import clean; "
                          "clean('a photo of a dog'); print('ftfy' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cached_tables_give_the_same_ids(tmp_path, monkeypatch):
    """The tables are built once and then loaded from $CLIPFIND_CACHE/tokenizer; a damaged or
    unwritable cache is rebuilt or skipped, with the same ids every time."""
    monkeypatch.setenv("CLIPFIND_CACHE", str(tmp_path / "cache"))
    texts = varied_texts(400, seed=5)
    built = BpeTokenizer()(texts)
    (saved,) = (tmp_path / "cache" / "tokenizer").glob("*.npz")
    assert np.array_equal(BpeTokenizer()(texts), built)  # loaded from the cache
    saved.write_bytes(saved.read_bytes()[:100])  # truncated: rebuilt
    assert np.array_equal(BpeTokenizer()(texts), built)
    assert saved.stat().st_size > 100
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CLIPFIND_CACHE", str(tmp_path / "file"))  # the cache cannot be made
    assert np.array_equal(BpeTokenizer()(texts), built)
