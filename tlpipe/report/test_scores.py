"""What the evaluate stage reads besides the features, and what it writes and prints about the test split.

`finetuned_logits` reads the infer stage's test logits, checked against their record; `val_comparison`
says which model to ship from val alone; the rest turns the scores into the per-image prediction
tables, their galleries and the stage's closing lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tlpipe.ingest import audit
from tlpipe.io import atomic_path, load_tensors, read_json
from tlpipe.manifest import hashes_by_path
from tlpipe.paths import (FINETUNED_TEST, FINETUNED_VAL, GALLERY, HEAD_CONFIG, HEAD_HELDOUT,
                          PREDICTIONS_META, TEST_DUPLICATES, TEST_PREDICTIONS)
from tlpipe.report import gallery
from tlpipe.report.metrics import mcnemar, paired_log_loss
from tlpipe.report.summary import ship_line
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


def val_comparison(head_cfg: dict, manifest: pd.DataFrame, temperature: dict[str, float]) -> dict:
    """Head against fine-tuned model on the val images, paired: the head by its held-out logits
    (out-of-fold over train + val, or on val: it was not fitted on these images), the fine-tuned model
    by the infer stage's val logits. The verdict is exact McNemar's on accuracy, as on test; each
    model's log loss at its own `temperature` (as shipped) and their paired difference sit beside it.
    Val chose the fine-tuned model's kept epoch, so the comparison leans its way; `ship` is the
    fine-tuned model only when it is significantly better."""
    held = load_tensors(HEAD_HELDOUT, "head", head_cfg.get("heldout_sha256"), HEAD_CONFIG)
    tuned = load_tensors(FINETUNED_VAL, "infer", read_json(PREDICTIONS_META).get("val_sha256"), PREDICTIONS_META)
    position = {i: row for row, i in enumerate(held["ids"].tolist())}
    missing = [i for i in tuned["ids"].tolist() if i not in position]
    if missing or held["logits"].shape[1] != tuned["logits"].shape[1]:
        raise TlpipeError(f"{HEAD_HELDOUT}: no held-out logits for {len(missing)} of the val images the infer stage "
                          "scored; rerun the head stage")
    y = manifest.loc[tuned["ids"].numpy(), "target"].to_numpy()
    if not len(y):
        return {"images": 0, "verdict": "no val images", "ship": "head"}
    z_head = held["logits"][[position[i] for i in tuned["ids"].tolist()]].double().numpy()
    z_tuned = tuned["logits"].double().numpy()
    losses = paired_log_loss(y, z_head / temperature["head"], z_tuned / temperature["finetuned"])
    paired = mcnemar(y, z_head.argmax(1), z_tuned.argmax(1))
    v = {"images": len(y), "head_accuracy": round(float((z_head.argmax(1) == y).mean()), 6),
         "finetuned_accuracy": round(float((z_tuned.argmax(1) == y).mean()), 6),
         "head_only_right": paired["a_only"], "finetuned_only_right": paired["b_only"], "p_value": paired["p_value"],
         "head_log_loss": losses["log_loss_a"], "finetuned_log_loss": losses["log_loss_b"],
         "log_loss_difference": losses["difference"], "log_loss_difference_se": losses["difference_se"],
         "head_temperature": temperature["head"], "finetuned_temperature": temperature["finetuned"]}
    v["verdict"] = verdict({**v, "significant": paired["significant"]})
    return {**v, "ship": "finetuned" if v["verdict"] == "finetuned better" else "head"}


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
    if "val_comparison" in scores:
        lines.append(ship_line(scores["val_comparison"]))
    if scores["val"]["val_too_small"]:
        lines.append(audit.val_warning(scores["val"]))
    return lines + [line + f"; listed in {TEST_DUPLICATES}" for line in audit.describe(duplicates)]
