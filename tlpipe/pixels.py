"""Decoding an image file into the model's input pixels with Pillow and numpy alone (no torch).

The evaluation geometry of a preprocessing record (tlpipe.preprocessing): EXIF transpose, RGB, resize
the short side to resize_size, centre-crop img_size, uint8 CHW. The decode stage (through
tlpipe.images.eval_images), `tlpipe predict` and the torch-free ONNX path all decode here, so a
deployed model sees the pixels it was trained and checked on. The resize and crop are torchvision's
`Resize(resize_size)` + `CenterCrop(img_size)` on a PIL image, to the byte (tests/test_export.py).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `short`, the long side is truncated."""
    long = int(short * max(width, height) / min(width, height))
    return (short, long) if width <= height else (long, short)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> 8-bit L, by the range the values can span.

    A fixed scale per depth (not per-image min-max) keeps brightness comparable across images;
    PIL's own convert("L") would clip everything above 255 to white.
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16"):
        scale = 65535.0
    elif img.mode == "F" and top <= 1.0:
        scale = 1.0  # float images are conventionally 0..1
    elif top <= 255.0:
        scale = 255.0  # 8-bit values stored in a wider mode
    elif top <= 65535.0:
        scale = 65535.0  # e.g. 16-bit PGM, which PIL opens as mode I
    else:
        scale = top  # 32-bit data: no standard range, so its own maximum
    return Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied, transparency composited on white, 16-bit scaled to 8."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _high_bit_depth_to_l(img)
    # "transparency" in info: a palette entry or a tRNS colour key (L and RGB PNGs have those too).
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def load_rgb_drafted(path: str | Path, resize_size: int, interpolation: str) -> Image.Image:
    """load_rgb, except that a JPEG whose short side is >= 4x resize_size is decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, never below 2x resize_size) and resized here, short side to
    resize_size, as the evaluation resize would: several times faster on large photos.

    The resize maps exactly the region the full image covers (`box`: a reduced decode pads to whole
    pixels), to the size the full decode would be resized to, before EXIF rotation (rotations and
    flips commute with resizing). Agreement with the full decode is measured in tests/test_decode.py.
    """
    with Image.open(path) as img:
        w, h = img.size
        if img.format != "JPEG" or min(w, h) < 4 * resize_size:
            img.load()
            return to_rgb(img)
        _, box = img.draft(img.mode, (2 * resize_size, 2 * resize_size))
        img.load()
        return to_rgb(img.resize(resized_size(w, h, resize_size), RESAMPLE[interpolation], box=box))


def check_image(path: str | Path, root: str | Path | None = None) -> str | None:
    """Fully decode one file. Returns None when usable, else the reason it is not.

    With `root`, a file that resolves outside it (a symlink, or a folder on its path that is one,
    pointing elsewhere) is refused unread: the data root is the only place images come from.
    """
    path = Path(path)
    try:
        if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
            return f"symlink to {path.resolve()}, outside the data root {root}"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat both as refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                rgb = to_rgb(img)
        if min(rgb.size) < 1:
            return "image has no pixels"
    except FileNotFoundError:
        return "file not found" + (" (broken symlink)" if path.is_symlink() else "")
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
        return f"{size}, more than PIL's limit of {Image.MAX_IMAGE_PIXELS} (a decompression bomb?)"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot decode: {e}".splitlines()[0]
    return None


def eval_pixels(img: Image.Image, img_size: int, resize_size: int, interpolation: str) -> np.ndarray:
    """Resize the short side, centre-crop: uint8 CHW. resize_size >= img_size (params.yaml checks it),
    so the crop never needs padding."""
    size = resized_size(img.width, img.height, resize_size)
    if size != img.size:
        img = img.resize(size, RESAMPLE[interpolation])
    top = int(round((img.height - img_size) / 2.0))
    left = int(round((img.width - img_size) / 2.0))
    img = img.crop((left, top, left + img_size, top + img_size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_eval_pixels(path: str | Path, geometry: dict) -> np.ndarray:
    """One image file at the geometry of a preprocessing record, as uint8 CHW."""
    if geometry["jpeg_draft"]:
        img = load_rgb_drafted(path, geometry["resize_size"], geometry["interpolation"])
    else:
        img = load_rgb(path)
    return eval_pixels(img, geometry["img_size"], geometry["resize_size"], geometry["interpolation"])
