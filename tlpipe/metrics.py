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
