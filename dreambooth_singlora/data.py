"""Reading a user's photos, for training and scoring alike: any format the installed Pillow opens, any mode,
any orientation; bad files skipped (training) or named in an error (scoring).

Every image becomes an RGB PIL image with EXIF orientation applied: CMYK and palette images
are converted, transparency is composited on white, 16-bit grayscale is scaled (not clipped)
to 8 bits. `IMAGE_SUFFIXES` is the one list of photo suffixes, read off Pillow's registered openers.
Unreadable, truncated or empty files, and photos in a format this Pillow cannot open (.heic without
a plugin, say), are skipped with a warning naming them; other files (.txt, ...) are ignored.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError

logger = logging.getLogger(__name__)



def _pillow_suffixes() -> frozenset[str]:
    """The suffixes of every format the installed Pillow has an opener for (.avif where it is built with AVIF)."""
    Image.init()  # registers every plugin that this Pillow can load
    # MPO (multi-picture JPEG) is opened by the JPEG opener, so it has no entry of its own in Image.OPEN
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN or fmt == "MPO")


IMAGE_SUFFIXES = _pillow_suffixes()
# Photo formats that a Pillow may lack (a plugin or a build option) or only write: a file with one of these
# suffixes that IMAGE_SUFFIXES does not hold is named in a warning rather than passed over in silence.
_OTHER_PHOTO_SUFFIXES = frozenset(
    {".avif", ".avifs", ".heic", ".heif", ".jxl", ".jp2", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf",
     ".rw2", ".svg", ".pdf", ".palm"}) - IMAGE_SUFFIXES
COMMON_SUFFIXES = ".jpg, .png, .webp, .tif, .bmp, .gif" + (", .avif" if ".avif" in IMAGE_SUFFIXES else "")


def use_cpu_threads(device) -> None:
    """On a CPU, unless OMP_NUM_THREADS says otherwise, half the cores (at least one): torch's default of one
    thread per core ran about 20x slower than one thread on a 2-core machine that had other work to do."""
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, orientation applied, transparency on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit: scale to 0..255, don't clip
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "P"):  # a palette may hold transparency too
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def list_images(folder) -> list[Path]:
    """Image files (by suffix, see IMAGE_SUFFIXES) directly in `folder`, sorted; UserError if the folder is missing.
    A photo in a format this Pillow cannot open (e.g. .heic) is left out with a warning naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist (expected a folder of the subject's photos)")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for p in files:
        if p.suffix.lower() in _OTHER_PHOTO_SUFFIXES:
            logger.warning("skipping %s: the installed Pillow cannot open %s files (convert it to one of %s, or "
                           "install a Pillow plugin for it, e.g. pillow-heif for .heic)", p, p.suffix.lower(),
                           COMMON_SUFFIXES)
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def open_rgb(path) -> Image.Image:
    """Open and fully decode one image as 8-bit RGB (EXIF orientation applied, transparency on white, see
    to_rgb); UserError naming the file if it cannot be read. The reader for anything that must not be skipped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.draft("RGB", (4096, 4096))  # JPEG: decode huge photos at a reduced scale
                im.load()
                return to_rgb(im)
    except Exception as e:  # PIL raises many types for missing / truncated / corrupt / bomb files
        raise UserError(f"cannot read {path} as an image ({type(e).__name__}: {e}); expected a photo in a format "
                        f"Pillow opens ({COMMON_SUFFIXES}, ...)") from e


def read_image(path) -> Image.Image | None:
    """open_rgb, or None (with a warning naming the file) if it cannot be read."""
    try:
        return open_rgb(path)
    except UserError as e:
        logger.warning("skipping an unreadable photo: %s", e)
        return None


def load_images(folder, what: str = "instance", exclude=()) -> tuple[list[Image.Image], list[Path]]:
    """All readable images of `folder` but those named in `exclude` (never opened); UserError if none is usable."""
    paths = [p for p in list_images(folder) if p.name not in set(exclude)]
    if not paths:
        raise UserError(f"{what} folder {folder} has no image files ({COMMON_SUFFIXES}, ...)")
    good = [(im, p) for p in paths if (im := read_image(p)) is not None]
    if not good:
        raise UserError(f"no usable image in {what} folder {folder}: all {len(paths)} files failed to decode")
    return [im for im, _ in good], [p for _, p in good]


def prepare(img: Image.Image, resolution: int, crop: bool) -> torch.Tensor:
    """RGB image -> (3, H, W) in [-1, 1]: short side to `resolution`; center crop if `crop`,
    else the long side is trimmed to a multiple of 8 (random crops are taken later, from latents)."""
    return prepared(img, resolution, crop)[0]


def prepared(img: Image.Image, resolution: int, crop: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """`prepare`'s tensor and the (top, left) of its crop in the resized image (SDXL's crop conditioning)."""
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    w, h = img.size
    cw, ch = (resolution, resolution) if crop else (w - w % 8, h - h % 8)
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0, (top, left)


def image_grid(images: list[Image.Image], cols: int = 4, captions: list[str] | None = None,
               title: str | None = None, row_titles: list[str] | None = None) -> Image.Image:
    """Paste same-size images into rows of `cols` on a white sheet (the last row may be short): a title line
    on top, a line above each row (e.g. its prompt) and a caption under each image (e.g. its seed)."""
    if not images:
        raise UserError("no images to put on a sheet")
    font = ImageFont.load_default()
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    line = 12  # the default font's line height
    cap = line * max((c.count("\n") + 1 for c in captions), default=0) + 4 if captions else 0
    top = line + 6 if title else 0
    head = line + 4 if row_titles else 0
    sheet = Image.new("RGB", (cols * w, top + rows * (head + h + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    chars = max(8, w // 6)  # what fits under a tile
    for i, im in enumerate(images):
        x, y = (i % cols) * w, top + (i // cols) * (head + h + cap) + head
        if row_titles and i % cols == 0:
            draw.text((2, y - head + 1), row_titles[i // cols][: cols * w // 6], fill="black", font=font)
        sheet.paste(im.convert("RGB"), (x, y))
        if captions:
            text = "\n".join(part[:chars] for part in captions[i].split("\n"))
            draw.text((x + 2, y + h + 2), text, fill="black", font=font)
    return sheet
