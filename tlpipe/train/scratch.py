"""A small CNN trained from scratch: the baseline that shows what pretraining buys.

Three conv blocks (conv-BN-ReLU; a stride-2 first conv, max-pool between blocks), global average
pooling, a linear layer.
Images come from the decode stage's shards and stay in memory as uint8 (the baseline is
meant for the small data sets transfer learning is for); training draws batches and flips from a
generator seeded by `seed`, so a run on the same device is reproducible.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tlpipe.ingest.images import normalize_batch
from tlpipe.runtime import TlpipeError, progress


def small_cnn(n_classes: int, width: int) -> nn.Sequential:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]
    # A stride-2 stem and pooling after each block: the convolutions run at 1/4, 1/16 and 1/64 of
    # the input's pixels (about 4x fewer operations than full-resolution first blocks), so the
    # baseline stays cheap on a CPU.
    return nn.Sequential(*block(3, width, stride=2), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, n_classes))


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, mean, std, dev: torch.device) -> torch.Tensor:
    model.eval()
    chunks = [torch.softmax(model(normalize_batch(x[i:i + 256].to(dev), mean, std)), 1).cpu()
              for i in range(0, len(x), 256)]
    return torch.cat(chunks)


def train(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
          n_classes: int, *, epochs: int, batch_size: int, lr: float, weight_decay: float, width: int,
          hflip: bool, seed: int, mean, std, dev: torch.device) -> tuple[nn.Module, dict]:
    """Train; return the model of the epoch with the lowest val loss and a summary of the run."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn(n_classes, width).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))
    best = {"epoch": 0, "val_loss": math.inf, "val_accuracy": 0.0, "state": None}
    for epoch in progress(range(1, epochs + 1), desc="scratch"):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one image (at small sizes it raises)
                continue
            x = normalize_batch(x_train[idx].to(dev), mean, std)
            if hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip.to(dev)] = x[flip.to(dev)].flip(-1)
            loss = F.cross_entropy(model(x), y_train[idx].to(dev))
            if not torch.isfinite(loss):
                raise TlpipeError(f"scratch: loss is {loss.item()} at epoch {epoch}; lower scratch.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        proba = predict_proba(model, x_val, mean, std, dev)
        val_loss = float(F.nll_loss(torch.log(proba.clamp_min(1e-12)), y_val))
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss,
                    "val_accuracy": float((proba.argmax(1) == y_val).double().mean()),
                    "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("state"))
    best["parameters"] = sum(p.numel() for p in model.parameters())
    return model.eval(), best
