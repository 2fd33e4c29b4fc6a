"""`tlpipe predict`: top-k classes of new images with the head or the fine-tuned model.

Exactly the evaluation path: the model config's preprocessing record (`eval_images`, as the decode
stage, then its mean/std); for the head, the backbone's features computed by `inference.outputs`
(what the features stage caches) and then the head's linear layer (what evaluate applies to the
cached test features).
Folders are searched like the data stage's class folders (`tlpipe.images.list_files`: every file
but hidden and junk ones, whatever its extension), so predict takes exactly the files training
takes. Each file is decoded once up front as the model's loader will decode it; a file that fails
(not an image, malformed EXIF, a name that is not UTF-8...) is reported, on stderr and as a CSV
row with an error, and does not stop the run. The output path and the model are checked before
any image is decoded.
Probabilities are calibrated: the model's logits divided by its fitted temperature (head.json's,
fitted on out-of-fold logits; finetuned_calibration.json's, fitted on val), as evaluate scores them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import torch

from tlpipe import backbones, calibration, inference, linear
from tlpipe.images import check_image, eval_check, eval_images, list_files, shown
from tlpipe.io import atomic_path, read_json
from tlpipe.models import load_classifier, load_head
from tlpipe.paths import MODELS
from tlpipe.runtime import TlpipeError, device, inference_batch_size, workers


def collect(inputs: list[str]) -> list[Path]:
    """Files named on the command line as they are; folders searched as the data stage searches."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += list_files(path)
        else:
            files.append(path)  # a missing file becomes an error row, like an unreadable one
    return files


def check_output(out: Path) -> None:
    """Fail before any work when the CSV cannot be written where asked."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise TlpipeError(f"--out {out}: is a folder")
    if not folder.is_dir():
        raise TlpipeError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise TlpipeError(f"--out {out}: not writable")


def _loader(paths: list[Path], geometry: dict, dev: torch.device):
    return torch.utils.data.DataLoader(eval_images(paths, geometry), batch_size=inference_batch_size(dev),
                                       num_workers=workers())


class Model:
    """A trained model as predict uses it: its config (preprocessing, classes) and its probabilities."""

    def __init__(self, kind: str, models: Path):
        self.kind = kind
        if kind == "head":
            self.head, cfg = load_head(models / "head.safetensors", models / "head.json")
            self.backbone = backbones.pretrained_for(cfg, str(models / "head.json"))
            self.temperature = cfg.get("temperature", 1.0)  # fitted on out-of-fold logits
        else:
            self.model, cfg = load_classifier(models / "finetuned.safetensors", models / "finetuned.json")
            # the temperature the infer stage fitted on val; without it (infer not run yet), as trained
            calibrated = models / "finetuned_calibration.json"
            if not calibrated.is_file():
                print(f"note: {calibrated} missing (run the infer stage); probabilities are not calibrated",
                      file=sys.stderr)
            self.temperature = read_json(calibrated)["temperature"] if calibrated.is_file() else 1.0
        self.record, self.classes = cfg["preprocessing"], cfg["classes"]

    def proba(self, paths: list[Path], tta: str) -> torch.Tensor:
        """Calibrated class probabilities (with tta "flip": of the averaged probabilities)."""
        return calibration.scaled_proba(calibration.logits_of(self.raw_proba(paths, tta)), self.temperature).float()

    def raw_proba(self, paths: list[Path], tta: str) -> torch.Tensor:
        record, dev = self.record, device()
        loader = _loader(paths, record, dev)
        if self.kind == "finetuned":
            return inference.class_probabilities(self.model, loader, record["mean"], record["std"], dev, tta,
                                                 desc="fine-tuned")
        weight, bias = self.head.weight.detach(), self.head.bias.detach()
        views = [self.backbone.trunk] + ([inference.Mirrored(self.backbone.trunk)] if tta == "flip" else [])
        proba = [linear.predict_proba(inference.outputs(view, loader, record["mean"], record["std"], dev,
                                                        desc="features"), weight, bias) for view in views]
        return sum(proba) / len(proba)


def predict(inputs: list[str], model: str, top_k: int, out: Path, models: Path = MODELS,
            tta: str = "none") -> pd.DataFrame:
    check_output(out)
    files = collect(inputs)
    if not files:
        raise TlpipeError("no files found in " + ", ".join(shown(i) for i in inputs))
    trained = Model(model, models)
    load = eval_check(trained.record)
    errors = {}
    for path in files:
        reason = "no such file" if not path.exists() else check_image(path, load=load)
        if reason:
            errors[path] = reason
            print(f"error: {shown(path)}: {reason}", file=sys.stderr)
    good = [p for p in files if p not in errors]
    proba, classes = (trained.proba(good, tta) if good else None), trained.classes
    if proba is not None and not bool(torch.isfinite(proba).all()):
        raise TlpipeError(f"the {model} model gave non-finite probabilities; its weights are damaged")
    k = min(top_k, len(classes))
    rows, good_index = [], {p: i for i, p in enumerate(good)}
    for path in files:
        row = {"path": shown(path)}
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
