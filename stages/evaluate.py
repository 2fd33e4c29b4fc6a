"""evaluate: score the trained models on the test split, the one split no choice was made on.

metrics/test.json holds one block per model ({"head": {...}}), so `dvc exp show` puts each model's
numbers side by side; per-class scores and per-image predictions (for the confusion plots) sit
beside it.
"""

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from tlpipe import linear
from tlpipe.features import load_split
from tlpipe.io import atomic_path, read_json, write_json
from tlpipe.manifest import read_manifest
from tlpipe.metrics import per_class, summary
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, run_stage

HEAD = Path("models/head.safetensors")
HEAD_CONFIG = Path("models/head.json")
METRICS = Path("metrics/test.json")
PER_CLASS = Path("metrics/test_per_class.json")
PREDICTIONS = Path("metrics/predictions")


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


def main() -> None:
    load_params("evaluate")  # validates params.yaml; evaluate reads no params of its own yet
    manifest, classes = read_manifest()
    test, meta = load_split("test")
    head_config = read_json(HEAD_CONFIG)
    for key, value in head_config["features"].items():
        if meta[key] != value:
            raise TlpipeError(f"{HEAD_CONFIG}: trained on features with {key}={value!r}, but the "
                              f"test features have {meta[key]!r}; rerun the head stage")
    head = load_file(str(HEAD))
    y_true = test["labels"].numpy()
    proba = linear.predict_proba(test["features"], head["weight"], head["bias"]).numpy()

    scores = {"head": summary(y_true, proba)}
    write_json(METRICS, scores)
    write_json(PER_CLASS, {"head": per_class(y_true, proba, classes)})
    write_predictions(PREDICTIONS / "head.csv", manifest, test["ids"], y_true, proba, classes)
    for model, s in scores.items():
        print(f"{model}: test accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, "
              f"log loss {s['log_loss']:.4f} ({len(y_true)} images)")


if __name__ == "__main__":
    run_stage(main)
