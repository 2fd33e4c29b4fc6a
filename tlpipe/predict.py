"""`tlpipe predict`: top-k classes of new images with the head or the fine-tuned model.

Exactly the evaluation path: the model config's preprocessing record (`eval_images`, as the decode
stage, then its mean/std); for the head, the backbone's features computed by `inference.outputs`
(what the features stage caches) and then the head's linear layer (what evaluate applies to the
cached test features).
Probabilities are calibrated: the model's logits divided by its fitted temperature (head.json's,
fitted on out-of-fold logits; finetuned_calibration.json's, fitted on val), as evaluate scores them.
Files that are not decodable images are reported, on stderr and as CSV rows with an error, and do
not stop the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from tlpipe import backbones, calibration, inference, linear
from tlpipe.images import IMAGE_EXTENSIONS, check_image, eval_images
from tlpipe.io import atomic_path, read_json
from tlpipe.models import load_classifier
from tlpipe.paths import MODELS
from tlpipe.runtime import TlpipeError, device, inference_batch_size, workers


def collect(inputs: list[str]) -> list[Path]:
    """Files named on the command line as they are; folders searched for image files, recursively."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file()
                            and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in f.relative_to(path).parts))
        else:
            files.append(path)  # a missing file becomes an error row, like an unreadable one
    return files


def _loader(paths: list[Path], geometry: dict, dev: torch.device):
    return torch.utils.data.DataLoader(eval_images(paths, geometry), batch_size=inference_batch_size(dev),
                                       num_workers=workers())


def head_proba(paths: list[Path], models: Path = MODELS, tta: str = "none") -> tuple[torch.Tensor, list[str]]:
    config = models / "head.json"
    try:
        cfg = read_json(config)
        tensors = load_file(str(models / "head.safetensors"))
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the head stage first (dvc repro head)") from None
    backbone = backbones.pretrained_for(cfg, str(config))
    record, dev = cfg["preprocessing"], device()
    views = [backbone.trunk] + ([inference.Mirrored(backbone.trunk)] if tta == "flip" else [])
    proba = [linear.predict_proba(inference.outputs(view, _loader(paths, record, dev), record["mean"],
                                                    record["std"], dev, desc="features"),
                                  tensors["weight"], tensors["bias"]) for view in views]
    # the temperature fitted on out-of-fold logits (head.json; models from before it: 1)
    temperature = cfg.get("temperature", 1.0)
    return calibration.scaled_proba(calibration.logits_of(sum(proba) / len(proba)), temperature).float(), cfg["classes"]


def finetuned_proba(paths: list[Path], models: Path = MODELS, tta: str = "none") -> tuple[torch.Tensor, list[str]]:
    model, cfg = load_classifier(models / "finetuned.safetensors", models / "finetuned.json")
    dev = device()
    record = cfg["preprocessing"]
    proba = inference.class_probabilities(model, _loader(paths, record, dev), record["mean"], record["std"], dev,
                                          tta, desc="fine-tuned")
    # the temperature the infer stage fitted on val; without it (infer not run yet), as trained
    calibrated = models / "finetuned_calibration.json"
    if not calibrated.is_file():
        print(f"note: {calibrated} missing (run the infer stage); probabilities are not calibrated",
              file=sys.stderr)
    temperature = read_json(calibrated)["temperature"] if calibrated.is_file() else 1.0
    return calibration.scaled_proba(calibration.logits_of(proba), temperature).float(), cfg["classes"]


def predict(inputs: list[str], model: str, top_k: int, out: Path, models: Path = MODELS,
            tta: str = "none") -> pd.DataFrame:
    files = collect(inputs)
    if not files:
        raise TlpipeError("no image files found in " + ", ".join(inputs))
    errors = {}
    for path in files:
        reason = "no such file" if not path.exists() else check_image(path)
        if reason:
            errors[path] = reason
            print(f"error: {path}: {reason}", file=sys.stderr)
    good = [p for p in files if p not in errors]
    proba, classes = (None, [])
    if good:
        proba, classes = (head_proba if model == "head" else finetuned_proba)(good, models, tta)
    k = min(top_k, len(classes)) if classes else top_k
    rows, good_index = [], {p: i for i, p in enumerate(good)}
    for path in files:
        row = {"path": str(path)}
        if path in good_index:
            p, idx = proba[good_index[path]].topk(k)
            for rank in range(k):
                row[f"label_{rank + 1}"] = classes[int(idx[rank])]
                row[f"prob_{rank + 1}"] = round(float(p[rank]), 6)
        row["error"] = errors.get(path, "")
        rows.append(row)
    columns = ["path"] + [c for r in range(1, k + 1) for c in (f"label_{r}", f"prob_{r}")] + ["error"]
    table = pd.DataFrame(rows, columns=columns)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(good)} images predicted with the {model} model, {len(errors)} errors -> {out}")
    return table
