"""One evaluation loop: a model's outputs on every (uint8 image, index) batch, in order.

The features stage runs it on the backbone's trunk (outputs: pooled features); infer and
`tlpipe predict` run it on a whole classifier (outputs: logits). One definition, so the cached
features and a new image's features are computed the same way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from tlpipe.ingest.images import normalize_batch
from tlpipe.runtime import progress as progress_bar


@torch.inference_mode()
def outputs(model: nn.Module, batches: Iterable, mean: Sequence[float], std: Sequence[float],
            dev: torch.device, desc: str = "inference", progress: bool = True) -> torch.Tensor:
    """fp32 outputs on the CPU, concatenated in batch order (an empty tensor for no batches).

    fp32 on the CPU; on CUDA the forward runs under bf16 autocast, as fine-tuning's val pass does."""
    # channels_last is faster for these convnets on CUDA and on x86 CPUs (oneDNN) alike.
    model.to(dev, memory_format=torch.channels_last)
    amp = dev.type == "cuda"
    chunks, pending = [], None
    for images, _ in progress_bar(batches, desc=desc, enabled=progress):
        x = normalize_batch(images.to(dev, non_blocking=True), mean, std)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x.contiguous(memory_format=torch.channels_last)).float()
        # Copy the previous batch's outputs back only now: on a GPU, .cpu() waits for its forward,
        # so the next batch is read while this one computes. On the CPU it changes nothing.
        if pending is not None:
            chunks.append(pending.cpu())
        pending = out
    if pending is not None:
        chunks.append(pending.cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


@contextmanager
def threads_beside(loader_workers: int, dev: torch.device) -> Iterator[None]:
    """On the CPU, torch's threads limited to the cores `loader_workers` decoding processes leave.

    Its OpenMP threads wait for one another at every layer, so a thread that shares a core with a
    decoding worker stalls them all: on 2 cores, `tlpipe predict --model head` with 1 worker and
    2 threads was 9x slower than the ONNX path (bench/predict.py)."""
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - loader_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Mirrored(nn.Module):
    """A model applied to the horizontal mirror image: the view flip test-time augmentation adds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flip(-1))


def class_probabilities(model: nn.Module, batches, mean: Sequence[float], std: Sequence[float],
                        dev: torch.device, tta: str = "none", desc: str = "inference") -> torch.Tensor:
    """Softmax of a classifier's logits; with tta "flip", the mean of the image's and its mirror
    image's probabilities (two forward passes: twice the cost). `batches` must be re-iterable."""
    proba = torch.softmax(outputs(model, batches, mean, std, dev, desc=desc), dim=1)
    if tta == "flip":
        mirrored = torch.softmax(outputs(Mirrored(model), batches, mean, std, dev, desc=f"{desc} (mirrored)"), dim=1)
        proba = (proba + mirrored) / 2
    return proba
