"""retrieval.media.scan on real folder trees: what walk finds, what diff decides."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from retrieval.media import scan
from retrieval.media.images import open_image
from retrieval.media.scan import FileEntry, ScanDiff, content_hash, diff, walk


def jpeg(path: Path | bytes, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    """A small real JPEG (path may be bytes, for names that are not UTF-8)."""
    Image.new("RGB", (8, 8), colour).save(path if isinstance(path, bytes) else str(path), "JPEG")


def paths(root: Path, **kwargs) -> list[str]:
    """Walked paths relative to root."""
    return [os.path.relpath(e.path, root) for e in walk([root], **kwargs)]


def test_nested_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    jpeg(tmp_path / "z.jpg")
    jpeg(tmp_path / "a.JPEG")
    jpeg(tmp_path / "b" / "deep" / "deeper" / "x.jpg")
    jpeg(tmp_path / "b" / "c.jpg")
    jpeg(tmp_path / ".hidden" / "h.jpg")
    jpeg(tmp_path / "b" / "IMG_0042")  # no extension: found by sniffing
    (tmp_path / "b" / "notes.txt").write_text("hello")
    (tmp_path / "b" / "README").write_text("no extension, not an image")
    (tmp_path / "b" / "empty").write_bytes(b"")
    os.mkfifo(tmp_path / "b" / "pipe")  # must not block the walk
    assert paths(tmp_path) == [
        ".hidden/h.jpg",
        "a.JPEG",
        "b/IMG_0042",
        "b/c.jpg",
        "b/deep/deeper/x.jpg",
        "z.jpg",
    ]


def test_entries_carry_size_and_mtime(tmp_path: Path) -> None:
    jpeg(tmp_path / "a.jpg")
    os.utime(tmp_path / "a.jpg", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (entry,) = walk([str(tmp_path)])
    assert entry == FileEntry(str(tmp_path / "a.jpg"), (tmp_path / "a.jpg").stat().st_size,
                              1_600_000_000_123_456_789)
    assert os.path.isabs(entry.path)
    with pytest.raises(AttributeError):
        entry.size = 0  # frozen: safe to use as a key


def test_relative_root_gives_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "photos").mkdir()
    jpeg(tmp_path / "photos" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    assert [e.path for e in walk(["photos"])] == [str(tmp_path / "photos" / "a.jpg")]


def test_single_file_root_and_missing_root(tmp_path: Path) -> None:
    jpeg(tmp_path / "one.jpg")
    (tmp_path / "list.txt").write_text("x")
    errors: list[tuple[str, str]] = []
    found = list(walk([tmp_path / "one.jpg", tmp_path / "nope", tmp_path / "list.txt"],
                      on_error=lambda p, why: errors.append((p, why))))
    assert [e.path for e in found] == [str(tmp_path / "one.jpg")]
    assert errors == [(str(tmp_path / "nope"), "vanished"),
                      (str(tmp_path / "list.txt"), "not an image file")]


def test_symlinked_dir_ignored_without_flag(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    jpeg(tmp_path / "real" / "a.jpg")
    jpeg(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "real" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "real" / "alias.jpg").symlink_to(tmp_path / "elsewhere" / "b.jpg")
    root = tmp_path / "real"
    assert paths(root) == ["a.jpg", "alias.jpg"]  # linked files are listed, linked dirs not
    assert paths(root, follow_symlinks=True) == ["a.jpg", "alias.jpg", "link/b.jpg"]


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    jpeg(tmp_path / "a" / "b" / "x.jpg")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "a" / "b" / "c").mkdir()
    (tmp_path / "a" / "b" / "c" / "top").symlink_to(tmp_path, target_is_directory=True)
    found = paths(tmp_path, follow_symlinks=True)
    assert found == ["a/b/x.jpg"]


def test_broken_symlink_reported(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    errors: list[tuple[str, str]] = []
    assert list(walk([tmp_path], on_error=lambda p, why: errors.append((p, why)))) == []
    assert errors == [(str(tmp_path / "dangling.jpg"), "broken symlink")]


def test_exclude_library_dir(tmp_path: Path) -> None:
    (tmp_path / ".clipfind" / "thumbs").mkdir(parents=True)
    jpeg(tmp_path / ".clipfind" / "thumbs" / "t.jpg")
    jpeg(tmp_path / "photo.jpg")
    (tmp_path / "via").symlink_to(tmp_path / ".clipfind", target_is_directory=True)
    # Excluded by identity, so another spelling of the path is excluded too.
    excluded = {tmp_path / "sub" / ".." / ".clipfind"}
    (tmp_path / "sub").mkdir()
    assert paths(tmp_path, exclude=excluded, follow_symlinks=True) == ["photo.jpg"]
    # Without it, the folder is walked once, under its first name in sorted order.
    assert paths(tmp_path, follow_symlinks=True) == [".clipfind/thumbs/t.jpg", "photo.jpg"]


def test_overlapping_roots_walk_each_dir_once(tmp_path: Path) -> None:
    (tmp_path / "2020").mkdir()
    jpeg(tmp_path / "2020" / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    found = [e.path for e in walk([tmp_path / "2020", tmp_path])]
    assert found == [str(tmp_path / "2020" / "a.jpg"), str(tmp_path / "b.jpg")]


def test_non_utf8_name(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    try:
        jpeg(raw)
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    jpeg(tmp_path / "plain.jpg")
    entries = list(walk([tmp_path]))
    assert len(entries) == 2
    odd = next(e for e in entries if "plain" not in e.path)
    assert os.fsencode(odd.path) == raw  # round-trips to the bytes on disk
    assert open_image(odd.path).size == (8, 8)
    assert content_hash(odd.path) == content_hash(raw)
    assert odd.path.encode("utf-8", "surrogateescape") == raw  # how to store it


def test_very_long_path(tmp_path: Path) -> None:
    deep = tmp_path
    for i in range(30):
        deep = deep / f"level-{i:02d}-{'x' * 40}"
    deep.mkdir(parents=True)
    jpeg(deep / "bottom.jpg")
    (entry,) = walk([tmp_path])
    assert len(entry.path) > 1000
    assert entry.path == str(deep / "bottom.jpg")
    assert open_image(entry.path).size == (8, 8)


def test_unreadable_dir_reported_and_walk_goes_on(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "open").mkdir()
    jpeg(tmp_path / "locked" / "a.jpg")
    jpeg(tmp_path / "open" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):  # root can read anything, so deny it by hand
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(scan.os, "scandir", scandir)
    errors: list[tuple[str, str]] = []
    found = paths(tmp_path, on_error=lambda p, why: errors.append((p, why)))
    assert found == ["open/b.jpg"]
    assert errors == [(str(tmp_path / "locked"), "permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_chmod_000_dir(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    jpeg(tmp_path / "locked" / "a.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        errors: list[tuple[str, str]] = []
        assert paths(tmp_path, on_error=lambda p, why: errors.append((p, why))) == []
        assert errors == [(str(tmp_path / "locked"), "permission denied")]
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_errors_logged_without_callback(tmp_path: Path, caplog) -> None:
    assert list(walk([tmp_path / "missing"])) == []
    assert "missing" in caplog.text and "vanished" in caplog.text


def test_content_hash(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob.jpg"
    path.write_bytes(data)
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert content_hash(path) == expected
    assert content_hash(str(path), chunk=1000) == expected  # chunking does not matter
    assert len(expected) == 32
    (tmp_path / "empty").write_bytes(b"")
    assert content_hash(tmp_path / "empty") == hashlib.blake2b(digest_size=16).hexdigest()
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "nope")


def test_diff_exact() -> None:
    entries = [
        FileEntry("/p/new.jpg", 10, 100),
        FileEntry("/p/same.jpg", 20, 200),
        FileEntry("/p/bigger.jpg", 31, 300),
        FileEntry("/p/touched.jpg", 40, 401),
        FileEntry("/p/same.jpg", 20, 200),  # listed twice (overlapping roots)
    ]
    known = {
        "/p/same.jpg": (20, 200),
        "/p/bigger.jpg": (30, 300),
        "/p/touched.jpg": (40, 400),
        "/p/zdeleted.jpg": (50, 500),
        "/p/adeleted.jpg": (60, 600),
    }
    assert diff(entries, known) == ScanDiff(
        new=[FileEntry("/p/new.jpg", 10, 100)],
        changed=[FileEntry("/p/bigger.jpg", 31, 300), FileEntry("/p/touched.jpg", 40, 401)],
        unchanged=["/p/same.jpg"],
        gone=["/p/adeleted.jpg", "/p/zdeleted.jpg"],
    )
    assert diff([], {}) == ScanDiff([], [], [], [])


def test_diff_keeps_rows_under_unreachable_paths() -> None:
    known = {"/p/locked/a.jpg": (1, 1), "/p/lockedX/b.jpg": (1, 1), "/p/c.jpg": (1, 1)}
    result = diff([], known, unreachable=["/p/locked/"])
    assert result.unchanged == ["/p/locked/a.jpg"]
    assert result.gone == ["/p/c.jpg", "/p/lockedX/b.jpg"]


def test_walk_then_diff_round_trip(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        jpeg(tmp_path / name)
    known = {e.path: (e.size, e.mtime_ns) for e in walk([tmp_path])}
    (tmp_path / "a.jpg").unlink()
    jpeg(tmp_path / "b.jpg", colour=(1, 2, 3))
    os.utime(tmp_path / "b.jpg", ns=(1, 1))
    jpeg(tmp_path / "d.jpg")
    result = diff(walk([tmp_path]), known)
    assert [e.path for e in result.new] == [str(tmp_path / "d.jpg")]
    assert [e.path for e in result.changed] == [str(tmp_path / "b.jpg")]
    assert result.unchanged == [str(tmp_path / "c.jpg")]
    assert result.gone == [str(tmp_path / "a.jpg")]
