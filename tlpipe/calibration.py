"""Temperature scaling (Guo et al. 2017), expected calibration error and the reliability diagram.

One scalar T divides a model's logits: argmax (so accuracy) is unchanged, confidence is not. T is
fitted by minimizing the log loss of held-out logits (the head's out-of-fold logits, the
fine-tuned model's val logits), over log T by a bounded 1-d search, and kept only if it lowers that
log loss: temperature scaling never raises the log loss it was fitted on (T = 1 otherwise).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as Guo et al.
LOG_T_RANGE = (-4.0, 4.0)  # T in [0.018, 55]: far beyond what a sane model needs


def log_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimizes the log loss of softmax(logits / T); 1.0 when none beats it."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    logits = logits.double()
    result = minimize_scalar(lambda t: log_loss(logits, labels, math.exp(t)), bounds=LOG_T_RANGE,
                             method="bounded", options={"xatol": 1e-6})
    t = math.exp(float(result.x))
    return t if log_loss(logits, labels, t) < log_loss(logits, labels) else 1.0


def logits_of(proba: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Log-probabilities: logits up to a per-row constant, which softmax ignores."""
    return torch.as_tensor(proba, dtype=torch.float64).clamp_min(1e-300).log()


def scaled_proba(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=1)


def reliability(y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence and accuracy of the top-1 prediction."""
    confidence = proba.max(1)
    correct = (proba.argmax(1) == y_true).astype(float)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bins (i/B, (i+1)/B]
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        conf = np.bincount(which, confidence, minlength=bins) / count
        acc = np.bincount(which, correct, minlength=bins) / count
    return {"count": count, "confidence": conf, "accuracy": acc}


def ece(y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    r = reliability(y_true, proba, bins)
    used = r["count"] > 0
    return float((r["count"][used] * np.abs(r["accuracy"][used] - r["confidence"][used])).sum()
                 / r["count"].sum())


def diagram(curves: dict[str, list[tuple[str, np.ndarray, np.ndarray]]], out, title: str) -> None:
    """One panel per model, one line per (label, y_true, proba), and the diagonal; a PNG at `out`."""
    from matplotlib.figure import Figure

    from tlpipe.io import atomic_path

    fig = Figure(figsize=(4.2 * len(curves), 4.0))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (model, lines) in zip(axes, curves.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
        for i, (label, y_true, proba) in enumerate(lines):
            r = reliability(y_true, proba)
            used = r["count"] > 0
            ax.plot(r["confidence"][used], r["accuracy"][used], marker="o", ms=3, color=f"C{i}",
                    label=f"{label} (ECE {ece(y_true, proba):.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"confidence ({ECE_BINS} bins)")
        ax.set_ylabel("accuracy")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
