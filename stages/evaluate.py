"""evaluate: score both models on the test split, the one split no choice was made on.

The head is scored on the cached test features; the fine-tuned model on the test images, with the
evaluation transform the features used. metrics/test.json holds one block per model
({"head": {...}, "finetuned": {...}}), so `dvc exp show` puts their numbers side by side;
per-class scores and per-image predictions (for the confusion plots) sit beside it.
"""

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from tlpipe import gallery, linear
from tlpipe.features import load_split
from tlpipe.images import ImageFiles, eval_transform, normalize_batch
from tlpipe.io import atomic_path, read_json, write_json
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.metrics import per_class, summary
from tlpipe.models import load_classifier
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, device, inference_batch_size, progress_enabled, run_stage, workers

HEAD = Path("models/head.safetensors")
HEAD_CONFIG = Path("models/head.json")
METRICS = Path("metrics/test.json")
FINETUNED = Path("models/finetuned.safetensors")
FINETUNED_CONFIG = Path("models/finetuned.json")
PER_CLASS = Path("metrics/test_per_class.json")
PREDICTIONS = Path("metrics/predictions")
GALLERY = Path("metrics/gallery")  # PNGs of the misclassified test images, one per model


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


@torch.inference_mode()
def finetuned_proba(manifest: pd.DataFrame, ids: torch.Tensor, classes: list[str]) -> torch.Tensor:
    model, cfg = load_classifier(FINETUNED, FINETUNED_CONFIG)
    if cfg["classes"] != classes:
        raise TlpipeError(f"{FINETUNED_CONFIG}: classes differ from the manifest's; rerun finetune")
    dev = device()
    model.to(dev, memory_format=torch.channels_last)
    paths = image_paths(manifest.loc[ids.numpy()])
    loader = torch.utils.data.DataLoader(ImageFiles(paths, eval_transform(**cfg["transform"])),
                                         batch_size=inference_batch_size(dev), num_workers=workers())
    chunks = []
    for images, _ in tqdm(loader, desc="fine-tuned on test", disable=not progress_enabled()):
        x = normalize_batch(images.to(dev), cfg["mean"], cfg["std"])
        chunks.append(torch.softmax(model(x.contiguous(memory_format=torch.channels_last)).float(), 1).cpu())
    return torch.cat(chunks)


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

    probas = {"head": proba, "finetuned": finetuned_proba(manifest, test["ids"], classes).numpy()}

    scores = {name: summary(y_true, p) for name, p in probas.items()}
    write_json(METRICS, scores)
    write_json(PER_CLASS, {name: per_class(y_true, p, classes) for name, p in probas.items()})
    for name, p in probas.items():
        write_predictions(PREDICTIONS / f"{name}.csv", manifest, test["ids"], y_true, p, classes)
        gallery.write(PREDICTIONS / f"{name}.csv", GALLERY / f"{name}.png", f"{name} model")
    for model, s in scores.items():
        print(f"{model}: test accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, "
              f"log loss {s['log_loss']:.4f} ({len(y_true)} images)")


if __name__ == "__main__":
    run_stage(main)
