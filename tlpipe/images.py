"""Images as torch tensors: the evaluation geometry (decoded by tlpipe.pixels), fine-tuning's augmentation."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

# The PIL-only part lives in tlpipe.pixels (torch-free, for ONNX prediction); re-exported here.
from tlpipe.pixels import (IMAGE_EXTENSIONS, check_image, eval_pixels, load_rgb,  # noqa: F401
                           load_rgb_drafted, to_rgb)


def _transforms():
    # torchvision costs 1.6 s of import on top of torch; only fine-tuning's augmentation needs it
    # (evaluation decodes with tlpipe.pixels), which keeps a head-only rerun short.
    from torchvision.transforms import v2
    return v2


def _interpolation(name: str):
    modes = _transforms().InterpolationMode
    return {"bilinear": modes.BILINEAR, "bicubic": modes.BICUBIC}[name]


def _eval_tensor(img: Image.Image, img_size: int, resize_size: int, interpolation: str) -> torch.Tensor:
    return torch.from_numpy(eval_pixels(img, img_size, resize_size, interpolation))


def eval_transform(img_size: int, resize_size: int, interpolation: str) -> Callable:
    """Resize the short side, centre-crop, uint8 CHW (tlpipe.pixels.eval_pixels, torchvision's
    Resize + CenterCrop to the byte). Normalization happens later, on the device."""
    return functools.partial(_eval_tensor, img_size=img_size, resize_size=resize_size,
                             interpolation=interpolation)


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
