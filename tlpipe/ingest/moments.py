"""Exact per-channel mean and std, streamed over uint8 image batches."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tlpipe.io import finite_number, read_json
from tlpipe.runtime import TlpipeError

CHANNELS = ("red", "green", "blue")


def read_stats(path: Path, use: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of data/stats.json, for `use` (what normalizes by them): refused with one line
    when a std is 0 (a channel constant over the training images: division by zero) or not finite."""
    try:
        stats = read_json(path)
    except FileNotFoundError:
        raise TlpipeError(f"{path}: missing; run the stats stage first (dvc repro stats)") from None
    mean, std = stats.get("mean"), stats.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3
            and all(map(finite_number, mean + std))):
        raise TlpipeError(f"{path}: mean and std must be 3 finite numbers each; rerun the stats stage")
    flat = [c for c, s in enumerate(std) if s <= 0]  # every one named: fixing one would not be enough
    if flat:
        names = [CHANNELS[c] for c in flat]
        names = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        values = sorted({std[c] for c in flat})
        what = (f"the {names} channel has std {values[0]} (it is constant" if len(flat) == 1 else
                f"the {names} channels have std {' and '.join(map(str, values))} (each is constant")
        raise TlpipeError(f"{path}: {what} over the {stats.get('images', '?')} training images), so {use} "
                          "would divide by zero; normalize by the backbone's statistics instead")
    return tuple(mean), tuple(std)


class ChannelMoments:
    """A per-channel histogram of the 256 uint8 levels, counted over every batch.

    Counts are integers, so the mean and variance computed from them at the end are exact (Python
    integers, one rounding to float64) whatever the batch size or order, in one pass; and counting
    is about 25x cheaper than summing float64 copies of the pixels. Values on the 0..1 scale.
    """

    def __init__(self, channels: int = 3):
        self.hist = torch.zeros(channels, 256, dtype=torch.int64)

    def update(self, batch: torch.Tensor) -> None:
        """batch: uint8 NCHW."""
        if batch.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {batch.dtype}")
        for c in range(self.hist.shape[0]):
            self.hist[c] += torch.bincount(batch[:, c].reshape(-1), minlength=256)

    @property
    def count(self) -> int:
        return int(self.hist[0].sum())

    def _sums(self, c: int) -> tuple[int, int, int]:
        h = self.hist[c].tolist()
        return sum(h), sum(v * n for v, n in enumerate(h)), sum(v * v * n for v, n in enumerate(h))

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor([s1 / (n * 255) for n, s1, _ in map(self._sums, range(self.hist.shape[0]))],
                            dtype=torch.float64)

    @property
    def std(self) -> torch.Tensor:
        # N^2 var = N S2 - S1^2, exactly, in integers
        return torch.tensor([math.sqrt((n * s2 - s1 * s1) / (n * n)) / 255
                             for n, s1, s2 in map(self._sums, range(self.hist.shape[0]))],
                            dtype=torch.float64)
