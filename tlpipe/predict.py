"""`tlpipe predict`: top-k classes of new images with the head or the fine-tuned model.

Exactly the evaluation path: the model config's geometry (`eval_images`, as the decode stage) and
mean/std; for the head, the backbone's features computed by `backbones.extract_features` (what the
features stage caches) and then the head's linear layer (what evaluate applies to the cached test
features).
Folders are searched like the data stage's class folders (`tlpipe.images.list_files`: every file
but hidden and junk ones, whatever its extension), so predict takes exactly the files training
takes. Each file is decoded once up front as the model's loader will decode it; a file that fails
(not an image, malformed EXIF, a name that is not UTF-8...) is reported, on stderr and as a CSV
row with an error, and does not stop the run. The model and the output path are checked before
any image is decoded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import torch

from tlpipe import backbones, linear
from tlpipe.images import check_image, eval_check, eval_images, list_files, shown
from tlpipe.io import atomic_path, read_json
from tlpipe.models import load_classifier, load_head
from tlpipe.runtime import TlpipeError, device, inference_batch_size, workers

MODELS = Path("models")


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
    """A trained model as predict uses it: its config (geometry, classes) and a probability function."""

    def __init__(self, kind: str, models: Path):
        self.kind = kind
        if kind == "head":
            self.head, cfg = load_head(models / "head.safetensors", models / "head.json")
            feat = cfg["features"]
            self.backbone = backbones.build(feat["backbone"])
            if self.backbone.weights_sha256 != feat["weights_sha256"]:
                raise TlpipeError(f"{models / 'head.json'}: the head was trained on features of other "
                                  f"{feat['backbone']} weights")
            self.geometry, self.mean, self.std = feat["transform"], feat["mean"], feat["std"]
        else:
            self.model, cfg = load_classifier(models / "finetuned.safetensors", models / "finetuned.json")
            self.geometry, self.mean, self.std = cfg["transform"], cfg["mean"], cfg["std"]
        self.classes = cfg["classes"]

    def proba(self, paths: list[Path]) -> torch.Tensor:
        dev = device()
        loader = _loader(paths, self.geometry, dev)
        if self.kind == "head":
            features = backbones.extract_features(self.backbone.trunk, loader, self.mean, self.std, dev)
            return linear.predict_proba(features, self.head.weight.detach(), self.head.bias.detach())
        # The classifier maps images to logits, so the features helper is the evaluation loop as well.
        logits = backbones.extract_features(self.model, loader, self.mean, self.std, dev, desc="fine-tuned")
        return torch.softmax(logits, dim=1)


def predict(inputs: list[str], model: str, top_k: int, out: Path, models: Path = MODELS) -> pd.DataFrame:
    check_output(out)
    files = collect(inputs)
    if not files:
        raise TlpipeError("no files found in " + ", ".join(shown(i) for i in inputs))
    trained = Model(model, models)
    load = eval_check(trained.geometry)
    errors = {}
    for path in files:
        reason = "no such file" if not path.exists() else check_image(path, load=load)
        if reason:
            errors[path] = reason
            print(f"error: {shown(path)}: {reason}", file=sys.stderr)
    good = [p for p in files if p not in errors]
    proba, classes = (trained.proba(good) if good else None), trained.classes
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
