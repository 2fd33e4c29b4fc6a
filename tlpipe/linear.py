"""Multinomial logistic regression on cached features, by full-batch L-BFGS (the linear probe).

Features are standardized with train statistics while fitting (it conditions L-BFGS well and makes
one L2 grid fit every backbone); the standardization is folded back into the weights at the end, so
the saved head is a plain Linear layer on raw backbone features, ready to sit on the backbone.
Statistics and folding are float64; the head's sweep fits in float32, about 3x faster than float64
(bench/head.py) and choosing the same L2 with the same accuracies: standardized features keep the
problem well conditioned. The single probe fine-tuning starts from stays float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Standardizer:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Standardizer":
        std = x.std(dim=0)
        # Constant features (e.g. dead ReLUs) carry no signal; dividing by 1 keeps them harmless.
        return cls(x.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize mean cross-entropy + l2/2 * ||W||^2 (bias unpenalized). x: standardized."""
    d = x.shape[1]
    w = torch.zeros(n_classes, d, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(n_classes, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fold(w: torch.Tensor, b: torch.Tensor, scaler: Standardizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the same classifier acting on raw (unstandardized) features."""
    w_raw = w / scaler.std
    return w_raw, b - w_raw @ scaler.mean


def predict_proba(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.to(weight.dtype) @ weight.T + bias, dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def sweep(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
          val_labels: torch.Tensor, n_classes: int, grid, max_iter: int):
    """The linear probe protocol: one fit per L2 in `grid` (strongest first, each warm-started from
    the last), the best val accuracy kept (ties: lower val log loss).

    Returns a row of scores per grid point, the index of the kept one, and its raw-feature weights.
    """
    scaler = Standardizer.fit(train_features.double())
    x_train, x_val = scaler(train_features.double()).float(), scaler(val_features.double()).float()
    rows, fits, init = [], [], None
    for l2 in grid:
        w, b = fit_logistic(x_train, train_labels, n_classes, float(l2), max_iter, init)
        init = (w, b)
        fits.append((w, b))
        val_logits = x_val @ w.T + b
        rows.append({
            "log10_l2": round(math.log10(l2), 4),
            "l2": float(l2),
            "train_accuracy": round(accuracy(x_train @ w.T + b, train_labels), 6),
            "val_accuracy": round(accuracy(val_logits, val_labels), 6),
            "val_log_loss": round(float(F.cross_entropy(val_logits, val_labels)), 6),
        })
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"]))
    w, b = fits[best]
    return rows, best, fold(w.double(), b.double(), scaler)


PROBE_MAX_ITER = 1000  # L-BFGS stops on its tolerances long before this; a cap, not a knob


def fit_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float,
              max_iter: int = PROBE_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear probe at a given L2 strength: standardize, fit, fold. Returns raw-feature weights.

    The head stage's grid fit at a single L2 point, cold-started, gives the same weights (to float32
    precision: the sweep fits in float32).
    """
    # One fit, so float64 costs little here; fine-tuning starts from it and early stopping compares
    # every epoch with it, so it is kept at full precision.
    x = features.double()
    scaler = Standardizer.fit(x)
    return fold(*fit_logistic(scaler(x), labels, n_classes, l2, max_iter), scaler)
