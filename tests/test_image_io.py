"""The one image reader (dreambooth_singlora.data): which files count as photos, and how they are decoded.

Training and scoring read photos through the same functions: `IMAGE_SUFFIXES` (what the installed Pillow can
open), `list_images` / `load_images` (skip with a warning) and `open_rgb` (an error naming the file).
"""

import logging
import warnings

import numpy as np
import pytest
from PIL import Image, features

from dreambooth_singlora.data import IMAGE_SUFFIXES, list_images, load_images, open_rgb, read_image
from dreambooth_singlora.errors import UserError


def halves(w, h, left, right):
    """An RGB image whose left half is `left` and right half `right`."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2:] = left, right
    return Image.fromarray(a)


def test_suffixes_are_what_this_pillow_opens():
    Image.init()
    opened = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    assert opened <= IMAGE_SUFFIXES  # everything Pillow has an opener for
    assert ".pdf" not in IMAGE_SUFFIXES  # Pillow only writes PDFs
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"} <= IMAGE_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown after a 90-degree clockwise turn, so the left half ends on top
    halves(64, 32, (255, 0, 0), (0, 0, 255)).save(tmp_path / "side.jpg", exif=exif, quality=95)
    for im in (open_rgb(tmp_path / "side.jpg"), read_image(tmp_path / "side.jpg")):
        a = np.asarray(im, dtype=np.float64)
        assert im.mode == "RGB" and im.size == (32, 64)
        # JPEG moves colours by a few levels; 40 away from the other colour cannot be a wrong turn
        assert a[:28, :, 0].min() > 215 and a[:28, :, 2].max() < 40  # top: red
        assert a[36:, :, 2].min() > 215 and a[36:, :, 0].max() < 40  # bottom: blue


def test_transparent_png_is_composited_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)  # fully transparent black ...
    a[:, 4:] = (255, 0, 0, 255)  # ... beside opaque red
    a[0, 0] = (0, 0, 255, 128)  # one half-transparent blue pixel
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    im = open_rgb(tmp_path / "rgba.png")
    out = np.asarray(im).astype(int)
    assert im.mode == "RGB"
    assert (out[1:, :4] == 255).all()  # transparent -> white, exactly
    assert (out[:, 4:] == (255, 0, 0)).all()  # opaque stays as it was
    # blue at alpha 128/255 over white: 255 * (1 - 128/255) = 127 for red and green; integer rounding allows 1
    assert np.abs(out[0, 0] - (127, 127, 255)).max() <= 1


def test_tif_and_avif_are_listed_and_read(tmp_path, caplog):
    halves(16, 16, (0, 255, 0), (0, 0, 255)).save(tmp_path / "a.tif")
    with warnings.catch_warnings():  # a Pillow older than its AVIF plugin warns that it knows no such feature
        warnings.simplefilter("ignore")
        avif = features.check("avif")
    if avif:  # a Pillow built with AVIF writes and reads it
        halves(16, 16, (0, 255, 0), (0, 0, 255)).save(tmp_path / "b.avif", quality=90)
        assert ".avif" in IMAGE_SUFFIXES
        assert [p.name for p in list_images(tmp_path)] == ["a.tif", "b.avif"]
        images, paths = load_images(tmp_path)
        assert len(images) == 2 and images[1].size == (16, 16)
        assert np.asarray(images[1])[:, :6, 1].min() > 200  # lossy, but still green on the left
    else:  # a Pillow without AVIF: the suffix is not accepted, and the file is named in a warning
        assert ".avif" not in IMAGE_SUFFIXES
        (tmp_path / "b.avif").write_bytes(b"\0" * 64)
        with caplog.at_level(logging.WARNING):
            assert [p.name for p in list_images(tmp_path)] == ["a.tif"]
        assert "b.avif" in caplog.text


def test_photo_this_pillow_cannot_open_is_named_not_skipped_silently(tmp_path, caplog):
    halves(16, 16, (0, 255, 0), (0, 0, 255)).save(tmp_path / "ok.png")
    (tmp_path / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 32)  # no HEIF opener in plain Pillow
    (tmp_path / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.WARNING):
        images, paths = load_images(tmp_path)
    assert [p.name for p in paths] == ["ok.png"]
    assert "phone.heic" in caplog.text and ".heic" in caplog.text
    assert "notes.txt" not in caplog.text  # not an image suffix: ignored quietly, as before


def test_open_rgb_raises_naming_the_file(tmp_path, caplog):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        open_rgb(tmp_path / "broken.jpg")
    with pytest.raises(UserError, match="missing.png"):
        open_rgb(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING):
        assert read_image(tmp_path / "broken.jpg") is None  # training's reader skips it instead
    assert "broken.jpg" in caplog.text
