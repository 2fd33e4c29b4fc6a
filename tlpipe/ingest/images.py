"""Images as torch tensors: the evaluation geometry (decoded by tlpipe.ingest.pixels), fine-tuning's augmentation.

Decoding itself (untrusted bytes, `decode_error`, `list_files`, the evaluation resize and crop) is
torch-free and lives in tlpipe.ingest.pixels, so that the ONNX path of `tlpipe predict` runs without torch;
its names are re-exported here for the stages and tools that already work with tensors.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from tlpipe.ingest.pixels import (JUNK_NAMES, MAX_ASPECT, BadImage, check_image, decode_error,  # noqa: F401
                           error_name, eval_load, eval_pixels, image_warnings, is_junk, list_files,
                           load_rgb, load_rgb_drafted, read_verified, shown, to_rgb, utf8_name)
from tlpipe.runtime import TlpipeError


def _transforms():
    # torchvision costs 1.6 s of import on top of torch; only fine-tuning's augmentation needs it
    # (evaluation decodes with tlpipe.ingest.pixels), which keeps a head-only rerun short.
    from torchvision.transforms import v2
    return v2


def _interpolation(name: str):
    modes = _transforms().InterpolationMode
    return {"bilinear": modes.BILINEAR, "bicubic": modes.BICUBIC}[name]


def _eval_tensor(img: Image.Image, img_size: int, resize_size: int, interpolation: str) -> torch.Tensor:
    return torch.from_numpy(eval_pixels(img, img_size, resize_size, interpolation))


def eval_transform(img_size: int, resize_size: int, interpolation: str) -> Callable:
    """Resize the short side, centre-crop, uint8 CHW (tlpipe.ingest.pixels.eval_pixels, torchvision's
    Resize + CenterCrop to the byte). Normalization happens later, on the device."""
    return functools.partial(_eval_tensor, img_size=img_size, resize_size=resize_size,
                             interpolation=interpolation)


def train_transform(img_size: int, interpolation: str, scale_min: float, hflip: bool,
                    randaugment_magnitude: int) -> Callable:
    """Fine-tuning's augmentation on a uint8 CHW tensor: random resized crop, optional flip and
    RandAugment; uint8 CHW out."""
    T = _transforms()
    steps = [T.RandomResizedCrop(img_size, scale=(scale_min, 1.0),
                                 interpolation=_interpolation(interpolation), antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment_magnitude > 0:
        # Its rotations and shears take only nearest or bilinear on tensors.
        steps.append(T.RandAugment(magnitude=randaugment_magnitude, interpolation=T.InterpolationMode.BILINEAR))
    return T.Compose(steps)


class ImageFiles(torch.utils.data.Dataset):
    """Images listed by path; yields (transformed image, index). With `hashes` (the manifest's
    sha256 of each file), every file's bytes are checked before they are decoded (read_verified)."""

    def __init__(self, paths: Sequence[str | Path], transform, load: Callable[..., Image.Image] = load_rgb,
                 hashes: Sequence[str] | None = None):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.load = load
        self.hashes = list(hashes) if hashes is not None else [None] * len(self.paths)
        if len(self.hashes) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.hashes)} hashes")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with image_warnings(self.paths[i]):
                img = self.load(self.paths[i], sha256=self.hashes[i])
        except TlpipeError:  # bytes that are not the manifest's
            raise
        except Exception as e:  # checked by the data stage, so only if the file changed since
            reason = str(e) if isinstance(e, BadImage) else f"{error_name(e)}: {e}"
            raise TlpipeError(f"{shown(self.paths[i])}: cannot decode ({reason})".splitlines()[0]) from None
        return self.transform(img), i


class TrainImages(torch.utils.data.Dataset):
    """Fine-tuning's training images: the decoded pixels of a split (a tlpipe.ingest.decoded.DecodedSplit,
    the train split at the training geometry). Indexed by position or by (position, repeat)
    (tlpipe.train.distributed.GlobalBatches), it yields (uint8 image, position, repeat); `augment` turns a
    batch of those into training crops on whatever device the batch is on, so a GPU augments its
    own batches and the loader only copies pixels.

    Each image's transforms draw from torch's RNG seeded by (seed, epoch, position, repeat): the
    same crops on any number of loader workers and in a resumed run as in an uninterrupted one.
    Set `epoch` before each epoch.
    """

    def __init__(self, split, transform, seed: int):
        self.split, self.transform, self.seed = split, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]):
        i, repeat = key if isinstance(key, tuple) else (key, 0)
        return self.split.rows(i, i + 1)[0][0], i, repeat

    def augment(self, images: torch.Tensor, positions: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
        """Random resized crop, flip and RandAugment of each image of a uint8 NCHW batch, on its device."""
        out = []
        for image, i, repeat in zip(images, positions.tolist(), repeats.tolist()):
            # Forked, so that augmenting leaves the RNG MixUp draws from as it was.
            with torch.random.fork_rng(devices=[]):
                # Modulo 2^63: torch's seed range, whatever the seed param (numpy's range, < 2^32).
                torch.manual_seed((((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) * 1_009 + repeat)
                                  % (1 << 63))
                out.append(self.transform(image))
        return torch.stack(out)


def eval_images(paths: Sequence[str | Path], geometry: dict, hashes: Sequence[str] | None = None) -> ImageFiles:
    """Images at the geometry of a preprocessing record (tlpipe.preprocessing): the one decoding path
    of the decode stage, `tlpipe predict` and anything else that must agree with them. `hashes`: the
    manifest's sha256 of each file, checked before it is decoded."""
    transform = eval_transform(geometry["img_size"], geometry["resize_size"], geometry["interpolation"])
    return ImageFiles(paths, transform, load=functools.partial(eval_load, geometry=geometry), hashes=hashes)


def eval_tensor_loader(geometry: dict) -> Callable[[Path], torch.Tensor]:
    """path -> the image's tensor exactly as eval_images yields it (the check before `tlpipe predict`,
    tlpipe.ingest.pixels.eval_check, decodes the same pixels without torch)."""
    transform = eval_transform(geometry["img_size"], geometry["resize_size"], geometry["interpolation"])
    return lambda path: transform(eval_load(path, geometry))


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 normalized, on x's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s
