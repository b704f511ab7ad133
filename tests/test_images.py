"""retrieval.media.images on real files: every format decodes, every broken file fails cleanly."""

from __future__ import annotations

import os
import struct
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin, features

from retrieval.errors import InputError
from retrieval.media import images
from retrieval.media.images import ImageError, is_candidate, open_image, read_info, sniff_format

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue: shows where a rotation put things."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def noisy_jpeg(path: Path, size: tuple[int, int] = (1024, 768)) -> Path:
    Image.effect_noise(size, 60).convert("RGB").save(path, quality=90)
    return path


def close_to(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


def expect(kind: str, path: Path | str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        open_image(path, **kwargs)
    assert info.value.kind == kind, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("suffix", "fmt", "save_kwargs"),
    [
        (".jpg", "JPEG", {"quality": 95}),
        (".png", "PNG", {}),
        (".webp", "WEBP", {"lossless": True}),
        (".bmp", "BMP", {}),
        (".tif", "TIFF", {}),
        (".gif", "GIF", {}),
    ],
)
def test_formats_decode_to_rgb(tmp_path: Path, suffix: str, fmt: str, save_kwargs: dict) -> None:
    path = tmp_path / f"pic{suffix}"
    halves((64, 48)).save(path, **save_kwargs)
    assert sniff_format(path) == fmt
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert close_to(img.getpixel((5, 5)), RED) and close_to(img.getpixel((60, 40)), BLUE)
    info = read_info(path)
    assert (info.width, info.height, info.format, info.taken_at) == (64, 48, fmt, None)


def test_sniffing_ignores_the_extension(tmp_path: Path) -> None:
    png_named_jpg = tmp_path / "liar.jpg"
    Image.new("RGB", (8, 8), GREEN).save(png_named_jpg, format="PNG")
    assert sniff_format(png_named_jpg) == "PNG"
    assert open_image(png_named_jpg).getpixel((0, 0)) == GREEN
    text = tmp_path / "notes.txt"
    text.write_text("BM is how this line starts, but it is no bitmap\n")
    assert sniff_format(text) is None
    assert sniff_format(tmp_path / "missing") is None
    assert sniff_format(tmp_path) is None


def test_sniff_heif_and_avif_brands(tmp_path: Path) -> None:
    heic = tmp_path / "x"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 32)
    assert sniff_format(heic) == "HEIF"
    avif = tmp_path / "y"
    avif.write_bytes(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + b"\x00" * 32)
    assert sniff_format(avif) == "AVIF"


def test_is_candidate(tmp_path: Path) -> None:
    assert is_candidate(tmp_path / "holiday.JPG")  # by name, no I/O
    assert is_candidate(tmp_path / "scan.TIFF")
    assert not is_candidate(tmp_path / "notes.txt")
    bare = tmp_path / "IMG_0001"
    Image.new("RGB", (8, 8)).save(bare, format="JPEG")
    assert is_candidate(bare)
    backup = tmp_path / "IMG_0001.jpg_original"
    backup.write_bytes(bare.read_bytes())
    assert not is_candidate(backup)
    other = tmp_path / "README"
    other.write_text("hello")
    assert not is_candidate(other)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert close_to(img.getpixel((10, 10)), RED)


def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (30, 20), c) for c in (GREEN, RED)]
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    assert close_to(open_image(path).getpixel((10, 10)), GREEN)


@pytest.mark.parametrize(
    ("orientation", "top_left", "size"),
    [(1, RED, (40, 20)), (3, BLUE, (40, 20)), (6, RED, (20, 40)), (8, BLUE, (20, 40))],
)
def test_exif_orientation_applied(
    tmp_path: Path, orientation: int, top_left: tuple, size: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    halves().save(path, exif=exif, quality=95)
    img = open_image(path)
    assert img.size == size
    assert close_to(img.getpixel((2, 2)), top_left)
    info = read_info(path)
    assert (info.width, info.height) == size


def test_exif_datetime_original(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[306] = "2019:01:01 00:00:00"  # DateTime (last edit): loses to DateTimeOriginal
    exif.get_ifd(0x8769)[36867] = "2021:06:15 12:34:56"
    path = tmp_path / "dated.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    assert read_info(path).taken_at == datetime(2021, 6, 15, 12, 34, 56)

    exif.get_ifd(0x8769)[36881] = "+02:00"  # OffsetTimeOriginal makes it aware
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    taken = read_info(path).taken_at
    assert taken == datetime(2021, 6, 15, 12, 34, 56, tzinfo=timezone(timedelta(hours=2)))


def test_exif_datetime_fallback_and_junk(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[306] = "2018:03:04 05:06:07"
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    assert read_info(path).taken_at == datetime(2018, 3, 4, 5, 6, 7)
    exif[306] = "0000:00:00 00:00:00"  # what some cameras write when the clock is unset
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    assert read_info(path).taken_at is None


def test_read_info_does_not_decode_pixels(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)

    def no_load(self):
        raise AssertionError("read_info decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    info = read_info(path)
    assert (info.width, info.height, info.format) == (3000, 2000, "PNG")


@pytest.mark.parametrize("want", [(224, 224), (32, 32), (300, 200)])
def test_draft_keeps_each_side_at_least_requested(tmp_path: Path, want: tuple[int, int]) -> None:
    path = noisy_jpeg(tmp_path / "big.jpg")
    img = open_image(path, draft_size=want)
    assert img.mode == "RGB"
    assert want[0] <= img.size[0] < 1024 and want[1] <= img.size[1] < 768
    assert img.size[0] * 768 == img.size[1] * 1024  # aspect kept


def test_draft_with_rotation_is_measured_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    Image.effect_noise((800, 400), 60).convert("RGB").save(path, exif=exif)
    # Upright it is 400 x 800. Measuring the request against the stored 800 x 400
    # would decode at 1/2 and hand back 200 x 400, narrower than the 300 asked for.
    assert open_image(path, draft_size=(300, 100)).size == (400, 800)
    assert open_image(path, draft_size=(100, 200)).size == (100, 200)


def test_draft_ignored_for_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("RGB", (500, 400)).save(path)
    assert open_image(path, draft_size=(32, 32)).size == (500, 400)


def test_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (5, 0, 10, 10))
    rgba.save(tmp_path / "rgba.png")
    img = open_image(tmp_path / "rgba.png")
    assert img.getpixel((1, 1)) == (255, 255, 255)  # transparent goes on white, not black
    assert img.getpixel((8, 1)) == BLUE

    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 5, 10))
    pal.save(tmp_path / "pal.png", transparency=0)
    img = open_image(tmp_path / "pal.png")
    assert img.getpixel((1, 1)) == GREEN and img.getpixel((8, 1)) == (255, 255, 255)

    Image.new("I;16", (10, 10), 32768).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert open_image(tmp_path / "deep.png").getpixel((0, 0)) == (128, 128, 128)  # scaled

    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert close_to(open_image(tmp_path / "cmyk.jpg").getpixel((5, 5)), RED)

    Image.new("LA", (10, 10), (0, 255)).save(tmp_path / "la.png")
    Image.new("1", (10, 10), 1).save(tmp_path / "bw.png")
    Image.new("L", (10, 10), 7).save(tmp_path / "grey.tif")
    assert open_image(tmp_path / "la.png").getpixel((0, 0)) == (0, 0, 0)
    assert open_image(tmp_path / "bw.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_image(tmp_path / "grey.tif").getpixel((0, 0)) == (7, 7, 7)


def test_result_outlives_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.png"
    Image.new("RGB", (10, 10), GREEN).save(path)
    img = open_image(path)
    path.unlink()
    assert img.resize((4, 4)).getpixel((0, 0)) == GREEN


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").write_bytes(b"")
    expect("empty", tmp_path / "zero.jpg")


@pytest.mark.parametrize("draft", [None, (32, 32)])
def test_truncated_jpeg(tmp_path: Path, draft) -> None:
    data = noisy_jpeg(tmp_path / "whole.jpg", (256, 256)).read_bytes()
    cut = tmp_path / "half.jpg"
    cut.write_bytes(data[: len(data) // 2])
    expect("truncated", cut, draft_size=draft)
    assert read_info(cut).width == 256  # the header alone is intact


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "whole.png"
    Image.effect_noise((128, 128), 60).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect("truncated", path)


def test_random_bytes_named_jpg_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "random.jpg"
    path.write_bytes(os.urandom(4096))
    expect("corrupt", path)


def test_jpeg_with_garbage_body_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "mangled.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    assert expect("corrupt", path).kind == "corrupt"


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n" * 10)
    expect("not_image", path)
    expect("not_image", tmp_path)  # a folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        expect("unreadable", path)
    finally:
        path.chmod(0o644)


def test_permission_denied_simulated(tmp_path: Path, monkeypatch) -> None:
    """Same path as the chmod test, for runs as root."""
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open_regular", denied)  # every open goes through it
    expect("unreadable", path)


def test_too_large_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (5000, 5000)).save(path)
    assert path.stat().st_size < 100_000

    def no_load(self):
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    err = expect("too_large", path, max_pixels=1_000_000)
    assert "5000x5000" in str(err)
    assert read_info(path).width == 5000  # info still works: it is only the header


def test_decompression_bomb_header(tmp_path: Path) -> None:
    """A header past Pillow's own hard limit; Pillow's global stays untouched."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    before = Image.MAX_IMAGE_PIXELS
    expect("too_large", path, max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == before


def test_vanished(tmp_path: Path) -> None:
    expect("vanished", tmp_path / "never-was.jpg")
    with pytest.raises(ImageError) as info:
        read_info(tmp_path / "never-was.jpg")
    assert info.value.kind == "vanished"


def test_image_error_is_an_input_error(tmp_path: Path) -> None:
    err = expect("vanished", tmp_path / "nope.png")
    assert isinstance(err, InputError) and err.kind in images.KINDS


@pytest.mark.skipif(images.HEIF_SUPPORTED, reason="pillow-heif is installed")
def test_heic_without_plugin_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    err = expect("unsupported", path)
    assert "pillow-heif" in str(err)


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_avif_decodes(tmp_path: Path) -> None:
    path = tmp_path / "pic.avif"
    Image.new("RGB", (32, 16), GREEN).save(path, quality=95)
    assert sniff_format(path) == "AVIF"
    img = open_image(path)
    assert img.size == (32, 16) and close_to(img.getpixel((8, 8)), GREEN)
