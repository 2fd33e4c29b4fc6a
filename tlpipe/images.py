"""Decoding images the same way everywhere, and the deterministic evaluation geometry."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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
        # torchvision's Resize(int): the short side becomes resize_size, the long side is truncated.
        long = int(resize_size * max(w, h) / min(w, h))
        size = (resize_size, long) if w <= h else (long, resize_size)
        resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
        return to_rgb(img.resize(size, resample, box=box))


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


def _transforms():
    # torchvision costs 1.6 s of import on top of torch; the stages that only decode (data, and
    # evaluate's gallery) never pay it, which keeps a head-only rerun short.
    from torchvision.transforms import v2
    return v2


def _interpolation(name: str):
    modes = _transforms().InterpolationMode
    return {"bilinear": modes.BILINEAR, "bicubic": modes.BICUBIC}[name]


def eval_transform(img_size: int, resize_size: int, interpolation: str) -> Callable:
    """Resize the short side, centre-crop, uint8 CHW. Normalization happens later, on the device."""
    T = _transforms()
    return T.Compose([
        T.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True),
        T.CenterCrop(img_size),
        T.PILToTensor(),
    ])


def train_transform(img_size: int, interpolation: str, scale_min: float, hflip: bool,
                    randaugment_magnitude: int) -> Callable:
    """Augmentation for fine-tuning: random resized crop, optional flip and RandAugment; uint8 CHW."""
    T = _transforms()
    steps = [T.RandomResizedCrop(img_size, scale=(scale_min, 1.0),
                                 interpolation=_interpolation(interpolation), antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment_magnitude > 0:
        # On the PIL image: tensor inputs support only nearest/bilinear for its geometric ops.
        steps.append(T.RandAugment(magnitude=randaugment_magnitude,
                                   interpolation=_interpolation(interpolation)))
    steps.append(T.PILToTensor())
    return T.Compose(steps)


class ImageFiles(torch.utils.data.Dataset):
    """Images listed by path; yields (transformed image, index).

    With a seed, random transforms draw from a generator seeded by (seed, epoch, index), so
    augmentation is the same whichever worker process loads an image, and however many there are:
    the worker count is a resource knob and must not change results. Set `epoch` before iterating
    (with non-persistent workers, each epoch's workers get the dataset as it is then).
    """

    def __init__(self, paths: Sequence[str | Path], transform, seed: int | None = None,
                 load: Callable[[Path], Image.Image] = load_rgb):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.seed = seed
        self.load = load
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.load(self.paths[i])
        if self.seed is not None:
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.transform(img), i


def eval_images(paths: Sequence[str | Path], geometry: dict) -> ImageFiles:
    """Images at the geometry of a preprocessing record (tlpipe.preprocessing): the one decoding path of the decode stage, `tlpipe predict` and anything else that must agree with them."""
    transform = eval_transform(geometry["img_size"], geometry["resize_size"], geometry["interpolation"])
    load = load_rgb
    if geometry["jpeg_draft"]:
        # After the drafted load the short side is resize_size already, so the Resize is a no-op.
        load = functools.partial(load_rgb_drafted, resize_size=geometry["resize_size"],
                                 interpolation=geometry["interpolation"])
    return ImageFiles(paths, transform, load=load)


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 normalized, on x's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s
