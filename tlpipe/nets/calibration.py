"""Temperature scaling (Guo et al. 2017), expected calibration error and the reliability diagram.

One scalar T divides a model's logits: argmax (so accuracy) is unchanged, confidence is not. T is
fitted by minimizing the log loss of held-out logits (the head's out-of-fold logits, the
fine-tuned model's val logits), over log T by a bounded 1-d search, and kept only if it lowers that
log loss: temperature scaling never raises the log loss it was fitted on (T = 1 otherwise).

`calibrate` decides whether the held-out set can support that fit at all (docs/trust.md,
"Calibration"). A correctly classified image's log loss falls monotonically as T falls, so only
misclassified images stop T from running to 0: on a perfectly classified held-out set the
"best" T is the search's lower bound, and every shipped probability becomes 1.00. Hence T is
fitted only on at least MIN_IMAGES held-out images of which at least MIN_ERRORS are misclassified,
within T_RANGE; otherwise T = 1 and the reason is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as Guo et al.
# Where T is searched. Fitted temperatures of real models sit well inside it (Guo et al.: about 1
# to 3; label smoothing's underconfidence: about 0.5); at T = 1/4 every logit is multiplied by 4.
T_RANGE = (0.25, 4.0)
LOG_T_RANGE = (math.log(T_RANGE[0]), math.log(T_RANGE[1]))
MIN_IMAGES = 50  # held-out images a temperature is fitted on, at least
MIN_ERRORS = 5   # of them misclassified, at least: only errors keep T from running to its lower bound


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


@dataclass(frozen=True)
class Temperature:
    """A model's temperature, whether it was fitted (`calibrated`), and why or why not."""
    value: float
    calibrated: bool
    reason: str

    def record(self) -> dict:
        """The keys models/*.json, metrics/*.json and the ONNX metadata carry."""
        return {"temperature": round(self.value, 6), "calibrated": self.calibrated, "calibration_reason": self.reason}


def calibrate(logits: torch.Tensor, labels: torch.Tensor, held_out: str) -> Temperature:
    """The temperature of held-out `logits`, by the rule of the module docstring; `held_out` names
    the set in the reason ("val", "out-of-fold")."""
    n = len(labels)
    errors = int((logits.argmax(1) != labels).sum()) if n else 0
    if n < MIN_IMAGES:
        return Temperature(1.0, False, f"{n} {held_out} images, fewer than {MIN_IMAGES}")
    if errors < MIN_ERRORS:
        return Temperature(1.0, False, f"{errors} of {n} {held_out} images misclassified, fewer than {MIN_ERRORS}")
    t = fit_temperature(logits, labels)
    if t == 1.0:
        return Temperature(1.0, False, f"no temperature lowers the log loss of {n} {held_out} images")
    bound = " (at the bound of the search)" if min(abs(t - b) / b for b in T_RANGE) < 1e-3 else ""
    return Temperature(t, True, f"fitted on {n} {held_out} images, {errors} misclassified{bound}")


def describe(fit: Temperature) -> str:
    """One phrase for a stage's output line."""
    if fit.calibrated:
        return f"temperature {fit.value:.3f} ({fit.reason})"
    return f"not calibrated, T = 1 ({fit.reason})"


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
