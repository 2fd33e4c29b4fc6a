"""What the evaluate stage reads besides the features, and what it writes and prints about the test split.

`finetuned_logits` reads the infer stage's test logits, checked against their record; the rest turns
the scores into the per-image prediction tables, their galleries and the stage's closing lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tlpipe.ingest import audit
from tlpipe.io import atomic_path, load_tensors, read_json
from tlpipe.manifest import hashes_by_path
from tlpipe.paths import FINETUNED_TEST, GALLERY, PREDICTIONS_META, TEST_DUPLICATES, TEST_PREDICTIONS
from tlpipe.report import gallery
from tlpipe.runtime import TlpipeError


def finetuned_logits(test_ids: torch.Tensor, classes: list[str]) -> torch.Tensor:
    """The fine-tuned model's test logits (float64), from the infer stage, for exactly these test images."""
    record = PREDICTIONS_META
    if not FINETUNED_TEST.exists():
        raise TlpipeError(f"{FINETUNED_TEST}: missing; run the infer stage first") from None
    try:
        expected = read_json(record).get("sha256")
    except FileNotFoundError:
        raise TlpipeError(f"{record}: missing; run the infer stage first (dvc repro infer)") from None
    predictions = load_tensors(FINETUNED_TEST, "infer", expected, record)
    if ("logits" not in predictions or "ids" not in predictions or not torch.equal(predictions["ids"], test_ids)
            or predictions["logits"].shape[1] != len(classes)):
        raise TlpipeError(f"{FINETUNED_TEST}: not the test images of the current features; "
                          "rerun the infer stage")
    return predictions["logits"].double()


def verdict(paired: dict) -> str:
    if not paired["significant"]:
        return "no significant difference"
    return "finetuned better" if paired["finetuned_only_right"] > paired["head_only_right"] else "finetuned worse"


def write_predictions(path: Path, manifest: pd.DataFrame, ids, y_true, proba, classes) -> None:
    rows = manifest.loc[ids.numpy()]
    table = pd.DataFrame({
        "path": rows["path"].to_numpy(),
        "actual": [classes[i] for i in y_true],
        "predicted": [classes[i] for i in proba.argmax(1)],
        "confidence": proba.max(1).round(6),
    })
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_per_image(calibrated: dict[str, np.ndarray], manifest: pd.DataFrame, ids, y_true, classes) -> None:
    """Per model, each test image's calibrated confidence (as `tlpipe predict` gives it) and a gallery."""
    for name, proba in calibrated.items():
        write_predictions(TEST_PREDICTIONS / f"{name}.csv", manifest, ids, y_true, proba, classes)
        gallery.write(TEST_PREDICTIONS / f"{name}.csv", GALLERY / f"{name}.png", f"{name} model",
                      hashes=hashes_by_path(manifest))


def describe(model: str, s: dict, images: int) -> str:
    calibrated = (f"{s['log_loss_calibrated']:.4f} and {s['ece_calibrated']:.4f} at temperature {s['temperature']:.3f}"
                  if s["calibrated"] else f"not calibrated: {s['calibration_reason']}")
    return (f"{model}: test accuracy {s['accuracy']:.4f} (95 % interval {s['accuracy_low']:.4f}-{s['accuracy_high']:.4f}), "
            f"macro-F1 {s['macro_f1']:.4f}, log loss {s['log_loss']:.4f}, ECE {s['ece']:.4f} ({calibrated}) "
            f"({images} images)")


def closing_lines(scores: dict, models: list[str], images: int, duplicates: pd.DataFrame) -> list[str]:
    """Each model's scores, the paired verdict, a too-small val's warning and the duplicates found."""
    paired = scores["paired"]
    lines = [describe(model, scores[model], images) for model in models]
    lines.append(f"head vs fine-tuned (exact McNemar, {paired['head_only_right']} vs {paired['finetuned_only_right']} "
                 f"images right by one model only): {paired['verdict']} (p = {paired['p_value']:.3g})")
    if scores["val"]["val_too_small"]:
        lines.append(audit.val_warning(scores["val"]))
    return lines + [line + f"; listed in {TEST_DUPLICATES}" for line in audit.describe(duplicates)]
