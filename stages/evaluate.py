"""evaluate: score both models on the test split, the one split no choice was made on.

The head is scored on the cached test features; the fine-tuned model by the probabilities the infer
stage computed on the test images. Evaluate itself runs no network, so re-scoring after a head-only
change takes a second. metrics/test.json holds one block per model
({"head": {...}, "finetuned": {...}}), so `dvc exp show` puts their numbers side by side;
per-class scores and per-image predictions (for the confusion plots) sit beside it.
"""

from pathlib import Path

import pandas as pd
import torch

from tlpipe import gallery, linear
from tlpipe.features import check_source, load_split
from tlpipe.io import atomic_path, load_tensors, read_json, write_json
from tlpipe.manifest import read_manifest
from tlpipe.metrics import per_class, summary
from tlpipe.params import load_params
from tlpipe.paths import (FINETUNED_TEST, GALLERY, HEAD, HEAD_CONFIG, TEST_METRICS, TEST_PER_CLASS,
                          TEST_PREDICTIONS)
from tlpipe.runtime import TlpipeError, run_stage


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


def finetuned_proba(test_ids: torch.Tensor, classes: list[str]) -> torch.Tensor:
    record = FINETUNED_TEST.parent / "meta.json"
    if not FINETUNED_TEST.exists():
        raise TlpipeError(f"{FINETUNED_TEST}: missing; run the infer stage first") from None
    try:
        expected = read_json(record).get("sha256")
    except FileNotFoundError:
        raise TlpipeError(f"{record}: missing; run the infer stage first (dvc repro infer)") from None
    predictions = load_tensors(FINETUNED_TEST, "infer", expected, record)
    if set(predictions) != {"proba", "ids"}:
        raise TlpipeError(f"{FINETUNED_TEST}: holds {sorted(predictions)}, not proba and ids")
    if not torch.equal(predictions["ids"], test_ids) or predictions["proba"].shape[1] != len(classes):
        raise TlpipeError(f"{FINETUNED_TEST}: not the test images of the current features; "
                          "rerun the infer stage")
    return predictions["proba"]


def main() -> None:
    load_params("evaluate")  # validates params.yaml; evaluate reads no params of its own yet
    manifest, classes = read_manifest()
    test, meta = load_split("test")
    head_config = read_json(HEAD_CONFIG)
    check_source(HEAD_CONFIG, head_config, meta, "rerun the head stage")
    head = load_tensors(HEAD, "head", head_config.get("sha256"), HEAD_CONFIG)
    y_true = test["labels"].numpy()
    proba = linear.predict_proba(test["features"], head["weight"], head["bias"]).numpy()

    probas = {"head": proba, "finetuned": finetuned_proba(test["ids"], classes).numpy()}

    scores = {name: summary(y_true, p) for name, p in probas.items()}
    write_json(TEST_METRICS, scores)
    write_json(TEST_PER_CLASS, {name: per_class(y_true, p, classes) for name, p in probas.items()})
    for name, p in probas.items():
        write_predictions(TEST_PREDICTIONS / f"{name}.csv", manifest, test["ids"], y_true, p, classes)
        gallery.write(TEST_PREDICTIONS / f"{name}.csv", GALLERY / f"{name}.png", f"{name} model")
    for model, s in scores.items():
        print(f"{model}: test accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, "
              f"log loss {s['log_loss']:.4f} ({len(y_true)} images)")


if __name__ == "__main__":
    run_stage(main)
