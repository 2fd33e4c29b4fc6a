"""The same classification metrics for every model, so head and fine-tuned sit side by side."""

from __future__ import annotations

import warnings

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


def _resample_scores(n_classes: int):
    """Metrics of many resamples at once (scipy's vectorized statistic: rows of y_true and y_pred
    along the last axis)."""
    def confusion(y_true, y_pred):
        y_true, y_pred = np.atleast_2d(y_true), np.atleast_2d(y_pred)
        b = y_true.shape[0]
        cells = (np.arange(b)[:, None] * n_classes * n_classes + y_true * n_classes + y_pred).ravel()
        cm = np.bincount(cells.astype(np.int64), minlength=b * n_classes * n_classes)
        cm = cm.reshape(b, n_classes, n_classes)
        return np.diagonal(cm, axis1=1, axis2=2).astype(float), cm.sum(2), cm.sum(1)

    def balanced_accuracy(y_true, y_pred, axis=-1):
        tp, support, _ = confusion(y_true, y_pred)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.nanmean(np.where(support > 0, tp / support, np.nan), axis=1)  # classes present
        return value if np.ndim(y_true) > 1 else value[0]

    def macro_f1(y_true, y_pred, axis=-1):
        tp, support, predicted = confusion(y_true, y_pred)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0).mean(1)
        return value if np.ndim(y_true) > 1 else value[0]

    return {"balanced_accuracy": balanced_accuracy, "macro_f1": macro_f1}


def studentized_mean_interval(values: np.ndarray, rng: np.random.Generator, samples: int) -> tuple[float, float]:
    """95 % bootstrap-t interval of a mean: second-order accurate for skewed values such as
    per-image log losses, whose few confident mistakes make percentile intervals too short."""
    n = len(values)
    mean, se = values.mean(), values.std(ddof=1) / np.sqrt(n)
    draws = values[rng.integers(0, n, size=(samples, n))]
    se_star = draws.std(axis=1, ddof=1) / np.sqrt(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (draws.mean(1) - mean) / se_star
    t = t[np.isfinite(t)]
    if se == 0 or len(t) == 0:
        return float(mean), float(mean)
    t_lo, t_hi = np.percentile(t, [2.5, 97.5])
    # A mean lies between the smallest and largest value: on tiny test sets a resample with a
    # near-zero spread can throw bootstrap-t far outside that range.
    return float(max(mean - t_hi * se, values.min())), float(min(mean - t_lo * se, values.max()))


def intervals(y_true: np.ndarray, proba: np.ndarray, seed: int,
              samples: int = BOOTSTRAP_SAMPLES) -> dict[str, tuple[float, float]]:
    """95 % intervals of the summary metrics over the test images.

    Accuracy: Wilson's score interval (a binomial proportion; good coverage down to tiny n).
    Log loss, a mean of skewed per-image losses: the studentized (bootstrap-t) interval.
    Balanced accuracy and macro-F1: the BCa bootstrap over test images (scipy.stats.bootstrap,
    bias-corrected and accelerated). `samples` resamples each, from generators seeded by `seed`,
    so the same run gives the same interval; a metric every resample agrees on gets its value as
    both ends.
    """
    from scipy.stats import bootstrap

    n, n_classes = proba.shape
    y_pred = proba.argmax(1)
    losses = -np.log(np.clip(proba[np.arange(n), y_true], 1e-15, 1.0))
    out = {"accuracy": wilson(int((y_pred == y_true).sum()), n),
           "log_loss": studentized_mean_interval(losses, np.random.default_rng(seed), samples)}
    for name, statistic in _resample_scores(n_classes).items():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples (all equal): handled below
            ci = bootstrap((y_true, y_pred), statistic, paired=True, vectorized=True, method="BCa",
                           n_resamples=samples, random_state=np.random.default_rng(seed)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            value = float(statistic(y_true, y_pred))
            lo, hi = value, value
        out[name] = (lo, hi)
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
            "both_wrong": int((~right_a & ~right_b).sum()),
            "p_value": float(f"{p:.3g}"),  # significant digits: a strong result is 2.4e-07, not 0
            "significant": bool(p < alpha)}


def paired_log_loss(y_true: np.ndarray, logits_a: np.ndarray, logits_b: np.ndarray) -> dict:
    """Two models' mean per-image log loss on the same images, and the paired difference (b - a) with
    its standard error (None for fewer than 2 images)."""
    def per_image(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        return np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y_true)), y_true]

    loss_a = per_image(np.asarray(logits_a, dtype=np.float64))
    loss_b = per_image(np.asarray(logits_b, dtype=np.float64))
    diff, n = loss_b - loss_a, len(y_true)
    return {"images": n, "log_loss_a": round(float(loss_a.mean()), 6) if n else None,
            "log_loss_b": round(float(loss_b.mean()), 6) if n else None,
            "difference": round(float(diff.mean()), 6) if n else None,
            "difference_se": round(float(diff.std(ddof=1) / np.sqrt(n)), 6) if n > 1 else None}
