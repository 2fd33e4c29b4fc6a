"""The same classification metrics for every model, so head and fine-tuned sit side by side."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def summary(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy, macro-F1 and log loss of predicted class probabilities."""
    y_pred = proba.argmax(axis=1)
    labels = np.arange(proba.shape[1])
    return {
        "accuracy": round(float(skm.accuracy_score(y_true, y_pred)), 6),
        "balanced_accuracy": round(float(skm.balanced_accuracy_score(y_true, y_pred)), 6),
        "macro_f1": round(float(skm.f1_score(y_true, y_pred, labels=labels, average="macro",
                                             zero_division=0)), 6),
        "log_loss": round(float(skm.log_loss(y_true, np.clip(proba, 1e-15, 1.0), labels=labels)), 6),
    }


def per_class(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, dict]:
    y_pred = proba.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0)
    return {c: {"precision": round(float(p), 6), "recall": round(float(r), 6),
                "f1": round(float(f), 6), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)}


# --- how sure: intervals and the paired test ----------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_SAMPLES = 2000


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _scores_of_resamples(y_true: np.ndarray, y_pred: np.ndarray, losses: np.ndarray, n_classes: int,
                         idx: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy, macro-F1 and log loss of every resample (rows of `idx`), vectorized."""
    b = idx.shape[0]
    cells = (np.arange(b)[:, None] * n_classes * n_classes + y_true[idx] * n_classes + y_pred[idx]).ravel()
    cm = np.bincount(cells, minlength=b * n_classes * n_classes).reshape(b, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(float)
    support, predicted = cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    # as scikit-learn: balanced accuracy over the classes present; macro-F1 over all classes
    return {"accuracy": tp.sum(1) / idx.shape[1], "balanced_accuracy": np.nanmean(recall, axis=1),
            "macro_f1": f1.mean(1), "log_loss": losses[idx].mean(1)}


def intervals(y_true: np.ndarray, proba: np.ndarray, seed: int,
              samples: int = BOOTSTRAP_SAMPLES) -> dict[str, tuple[float, float]]:
    """95 % intervals of the summary metrics over the test images.

    Accuracy: Wilson's score interval (a binomial proportion; good coverage down to tiny n).
    Balanced accuracy, macro-F1 and log loss: the percentile bootstrap over test images, `samples`
    resamples drawn with numpy's generator seeded by `seed`, so the same run gives the same interval.
    """
    n, n_classes = proba.shape
    y_pred = proba.argmax(1)
    losses = -np.log(np.clip(proba[np.arange(n), y_true], 1e-15, 1.0))
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    out = {"accuracy": wilson(int((y_pred == y_true).sum()), n)}
    for name, values in _scores_of_resamples(y_true, y_pred, losses, n_classes, idx).items():
        if name != "accuracy":
            lo, hi = np.nanpercentile(values, [2.5, 97.5])
            out[name] = (float(lo), float(hi))
    return out


def with_intervals(y_true: np.ndarray, proba: np.ndarray, seed: int,
                   samples: int = BOOTSTRAP_SAMPLES) -> dict[str, float]:
    """summary() plus `<metric>_low` / `<metric>_high`, the 95 % interval of each."""
    scores = summary(y_true, proba)
    for name, (lo, hi) in intervals(y_true, proba, seed, samples).items():
        scores[f"{name}_low"], scores[f"{name}_high"] = round(lo, 6), round(hi, 6)
    return scores


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, alpha: float = 0.05) -> dict:
    """Exact (binomial) McNemar test of two classifiers on the same images.

    Only the discordant images count: `a_only` right by a alone, `b_only` by b alone. Under "equally
    accurate" each is a fair coin flip, so the two-sided p-value is 2 * P(X <= min) for
    X ~ Binomial(a_only + b_only, 1/2), capped at 1.
    """
    from scipy.stats import binom

    right_a, right_b = pred_a == y_true, pred_b == y_true
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), n, 0.5)))
    return {"a_only": a_only, "b_only": b_only, "both_right": int((right_a & right_b).sum()),
            "both_wrong": int((~right_a & ~right_b).sum()), "p_value": round(p, 6),
            "significant": bool(p < alpha)}
