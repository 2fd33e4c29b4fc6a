"""The preprocessing record: what turns an image file into the tensor a model sees.

One shape, in the spirit of timm's `resolve_data_config`:

    {"img_size", "resize_size", "interpolation", "jpeg_draft",   # geometry: resize, centre-crop
     "normalize", "mean", "std"}                                  # normalization

The decode stage writes the geometry part into data/decoded/meta.json; the features stage adds the
normalization and writes the whole record into data/features/meta.json; the head and fine-tuned
model configs copy that record verbatim, so `tlpipe predict` and any deployment read the one
record. `check` is the one comparison every consumer makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tlpipe.runtime import TlpipeError

GEOMETRY_KEYS = ("img_size", "resize_size", "interpolation", "jpeg_draft")
# Fine-tuning's random crops are cut from the train split decoded once at this many times img_size
# (short side, centre square): at 1.15 a full-scale crop still moves and is downscaled a little, as
# from photos, while the shards hold 1.3x the pixels of the evaluation crop, not the whole photo.
TRAIN_MARGIN = 1.15
KEYS = GEOMETRY_KEYS + ("normalize", "mean", "std")


def geometry(image) -> dict:
    """The geometry part, from params.yaml's `image` section."""
    return {"img_size": image.img_size, "resize_size": image.resize_size,
            "interpolation": image.interpolation, "jpeg_draft": image.jpeg_draft}


def train_geometry(geometry: dict) -> dict:
    """The geometry the decode stage writes the train split at for fine-tuning's augmentation."""
    size = round(geometry["img_size"] * TRAIN_MARGIN)
    return {**geometry, "img_size": size, "resize_size": size}


def record(geometry: dict, normalize: str, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The whole record: a decoded geometry plus the normalization the backbone sees."""
    return {**{k: geometry[k] for k in GEOMETRY_KEYS}, "normalize": normalize,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def check(found: dict, expected: dict, where: str | Path, fix: str) -> None:
    """`found` (the record an artifact was made with) must equal `expected` on every key of
    `expected`: a model applied to pixels of another geometry or normalization gives wrong numbers
    without any error, so this is checked wherever two artifacts meet."""
    for key in expected:
        if found.get(key) != expected[key]:
            raise TlpipeError(f"{where}: made with {key}={found.get(key)!r}, but this input has "
                              f"{expected[key]!r}; {fix}")
