"""Decoding an image file into the model's input pixels with Pillow and numpy alone (no torch).

Every file is untrusted bytes: any exception PIL (or its EXIF, ICC or plugin code) raises while
decoding one is that file's reason to be skipped (`decode_error`), never a crash of the run. The
files considered are the same everywhere (`list_files`): the data stage's class folders and the
folders given to `tlpipe predict` alike, whatever their extension (AVIF, JFIF, JPEG 2000 and
extension-less files included); whether a file is an image is the decoder's to say.

The evaluation geometry of a preprocessing record (tlpipe.preprocessing): EXIF transpose, RGB, resize
the short side to resize_size, centre-crop img_size, uint8 CHW. The decode stage (through
tlpipe.ingest.images.eval_images), `tlpipe predict` and the torch-free ONNX path all decode here, so a
deployed model sees the pixels it was trained and checked on. The resize and crop are torchvision's
`Resize(resize_size)` + `CenterCrop(img_size)` on a PIL image, to the byte (tests/test_export.py).

A source image the data stage recorded is read with its manifest sha256 (`read_verified`): the
bytes decoded are the bytes hashed, so a file altered in place after the data stage (which DVC,
trusting mtimes, does not notice) is refused by name instead of decoded into different pixels.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
# Resized, an image's long side may reach this many times the resize size; beyond it, only the band
# the centre crop keeps is resized (`_crop_band`), so cost follows pixels, not aspect ratio.
MAX_ASPECT = 4


def is_junk(path: Path) -> bool:
    return any(part.startswith(".") or part in JUNK_NAMES for part in path.parts)


def list_files(folder: Path) -> list[Path]:
    """Every candidate image under `folder`, recursively: hidden and junk files left out.

    Broken symlinks are listed too, so that the decode check reports them instead of them vanishing.
    """
    return sorted(p for p in Path(folder).rglob("*") if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not is_junk(p.relative_to(folder)))


def shown(path) -> str:
    """A path printable anywhere: bytes that are not UTF-8 (kept by Python as surrogates) as \\xNN."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_name(path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error_name(e: BaseException) -> str:
    """`struct.error`, not a bare `error`; builtins without their module."""
    kind = type(e)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def read_verified(path: str | Path, sha256: str | None, record: str | Path | None = None) -> bytes:
    """The bytes of `path`, refused in one line (TlpipeError) unless their sha256 is `sha256`, the
    digest `record` (by default the manifest) holds for the file. One read: what is hashed is what
    gets decoded."""
    data = Path(path).read_bytes()
    if sha256 is not None:
        # Imported here: without a digest to check (`tlpipe predict`, a copy of this file beside an
        # ONNX runtime) this module needs Pillow and numpy alone.
        from tlpipe.io import check_digest
        from tlpipe.paths import MANIFEST

        check_digest(path, hashlib.sha256(data).hexdigest(), sha256, record or MANIFEST, "data")
    return data


def _open(path: str | Path, sha256: str | None) -> Image.Image:
    return Image.open(path) if sha256 is None else Image.open(io.BytesIO(read_verified(path, sha256)))


@contextmanager
def image_warnings(path: str | Path) -> Iterator[None]:
    """Warnings raised while decoding `path` (PIL's "Corrupt EXIF data", ...) printed as one line
    naming the image, not the site-packages line of PIL that raised them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for text in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        print(f"warning: {shown(path)}: {text}", file=sys.stderr)


def not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is (os.stat's st_mode): reading a FIFO would block."""
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


class BadImage(ValueError):
    """A decodable image that still cannot be used (e.g. malformed EXIF)."""


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `short`, the long side is truncated."""
    long = int(short * max(width, height) / min(width, height))
    return (short, long) if width <= height else (long, short)


def _resample(interpolation: str):
    return Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR


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
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # struct.error, TypeError, KeyError...: whatever malformed EXIF triggers
        raise BadImage(f"malformed EXIF ({error_name(e)}: {e})".splitlines()[0]) from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _high_bit_depth_to_l(img)
    # "transparency" in info: a palette entry or a tRNS colour key (L and RGB PNGs have those too).
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_rgb(path: str | Path, sha256: str | None = None) -> Image.Image:
    """The RGB image of a file; with `sha256`, its bytes checked first (read_verified)."""
    with _open(path, sha256) as img:
        img.load()
        return to_rgb(img)


def load_rgb_drafted(path: str | Path, resize_size: int, interpolation: str,
                     sha256: str | None = None) -> Image.Image:
    """load_rgb, except that a JPEG whose short side is >= 4x resize_size is decoded at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, never below 2x resize_size) and resized here, short side to
    resize_size, as the evaluation resize would: several times faster on large photos.

    The resize maps exactly the region the full image covers (`box`: a reduced decode pads to whole
    pixels), to the size the full decode would be resized to, before EXIF rotation (rotations and
    flips commute with resizing). Agreement with the full decode is measured in tests/test_decode.py.
    """
    with _open(path, sha256) as img:
        w, h = img.size
        if img.format != "JPEG" or min(w, h) < 4 * resize_size:
            img.load()
            return to_rgb(img)
        _, box = img.draft(img.mode, (2 * resize_size, 2 * resize_size))
        img.load()
        return to_rgb(img.resize(resized_size(w, h, resize_size), _resample(interpolation), box=box))


def _crop_band(img: Image.Image, img_size: int, resize_size: int, interpolation: str) -> Image.Image:
    """For an image whose resized long side would exceed MAX_ASPECT x resize_size (a 1x20000 strip
    would become 256 x 5 million pixels), resize only the band of the long side that the centre crop
    keeps, widened to resize_size so that eval_pixels' resize is a no-op and its centre crop takes
    exactly that band: the same pixels as the full resize (PIL samples a box's output pixels at the
    full resize's positions), at a cost of resize_size x the image's long side at most, instead of
    resize_size x the resized long side.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(resize_size * long / short)  # torchvision's Resize(int)
    if new_long <= MAX_ASPECT * resize_size:
        return img
    top = int(round((new_long - img_size) / 2.0))  # torchvision's CenterCrop
    band = resize_size + (resize_size - img_size) % 2  # band - img_size even: its centre crop is exact
    start = top - (band - img_size) // 2
    scale = long / new_long
    lo, hi = start * scale, (start + band) * scale
    resample = _resample(interpolation)
    # PIL resizes horizontally, then vertically; doing the two passes as two calls, with the box on
    # the long axis only, keeps each pass's output pixels those of the full resize (one call with
    # a 2-D box does not).
    if w <= h:
        return img.resize((resize_size, h), resample).resize((resize_size, band), resample,
                                                             box=(0, lo, resize_size, hi))
    return img.resize((band, h), resample, box=(lo, 0, hi, h)).resize((band, resize_size), resample)


def decode_error(load: Callable[[Path], object], path: Path) -> str | None:
    """Run `load(path)` (a decode of untrusted bytes); None if it worked, else the reason it did not.

    Any exception is the file's: PIL, its plugins and its EXIF parser raise many types on bad input.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "corrupt EXIF" and similar: the result decides
            # PIL only warns between 1x and 2x its pixel limit; treat both as refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            load(path)
    except FileNotFoundError:
        return "file not found" + (" (broken symlink)" if path.is_symlink() else "")
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
        return f"{size}, more than PIL's limit of {Image.MAX_IMAGE_PIXELS} (a decompression bomb?)"
    except BadImage as e:
        return f"cannot decode: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot decode: {e}".splitlines()[0]
    except MemoryError:
        return "cannot decode: out of memory"
    except Exception as e:
        return f"cannot decode: {error_name(e)}: {e}".splitlines()[0]
    return None


def check_image(path: str | Path, root: str | Path | None = None,
                load: Callable[[Path], object] | None = None) -> str | None:
    """Fully decode one file (with `load`, by default load_rgb). Returns None when usable, else the
    reason it is not.

    With `root`, a file that resolves outside it (a symlink, or a folder on its path that is one,
    pointing elsewhere) is refused unread: the data root is the only place images come from.
    """
    path = Path(path)
    if not utf8_name(path):
        return "file name is not valid UTF-8"
    try:
        if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
            return f"symlink to {path.resolve()}, outside the data root {root}"
        info = path.stat()
        kind = not_regular(info.st_mode)
        if kind:
            return f"not a regular file ({kind})"
        if info.st_size == 0:
            return "empty file (0 bytes)"
    except FileNotFoundError:
        return "file not found" + (" (broken symlink)" if path.is_symlink() else "")
    except (OSError, RuntimeError) as e:  # permission denied, a symlink loop
        return f"cannot read: {e}".splitlines()[0]
    return decode_error(load or _load_and_size, path)


def _load_and_size(path: Path) -> None:
    if min(load_rgb(path).size) < 1:
        raise BadImage("image has no pixels")


def eval_pixels(img: Image.Image, img_size: int, resize_size: int, interpolation: str) -> np.ndarray:
    """Resize the short side, centre-crop: uint8 CHW. resize_size >= img_size (params.yaml checks it),
    so the crop never needs padding."""
    size = resized_size(img.width, img.height, resize_size)
    if size != img.size:
        img = img.resize(size, _resample(interpolation))
    top = int(round((img.height - img_size) / 2.0))
    left = int(round((img.width - img_size) / 2.0))
    img = img.crop((left, top, left + img_size, top + img_size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def eval_load(path: Path, geometry: dict, sha256: str | None = None) -> Image.Image:
    """The RGB image eval_pixels gets: drafted when `jpeg_draft`, band-cropped when extreme; with
    `sha256`, the file's bytes checked first (read_verified)."""
    if geometry["jpeg_draft"]:
        # After the drafted load the short side is resize_size already, so the resize is a no-op.
        img = load_rgb_drafted(path, geometry["resize_size"], geometry["interpolation"], sha256)
    else:
        img = load_rgb(path, sha256)
    return _crop_band(img, geometry["img_size"], geometry["resize_size"], geometry["interpolation"])


def load_eval_pixels(path: str | Path, geometry: dict, sha256: str | None = None) -> np.ndarray:
    """One image file at the geometry of a preprocessing record, as uint8 CHW."""
    return eval_pixels(eval_load(Path(path), geometry, sha256), geometry["img_size"], geometry["resize_size"],
                       geometry["interpolation"])


def eval_check(geometry: dict) -> Callable[[Path], object]:
    """A `load` for check_image that decodes exactly as the evaluation path will (for `tlpipe predict`)."""
    return lambda path: load_eval_pixels(path, geometry)
