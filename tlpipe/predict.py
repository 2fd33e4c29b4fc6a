"""`tlpipe predict`: top-k classes of new images with the head, the fine-tuned model or an ONNX export.

Exactly the evaluation path: the model's preprocessing record (decoding by tlpipe.pixels, as the
decode stage, then its mean/std); for the head, the backbone's features computed by
`inference.outputs` (what the features stage caches) and then the head's linear layer (what evaluate
applies to the cached test features). With a `.onnx` file (the export stages' models/*.onnx), the
record comes from the file's metadata and onnxruntime runs it: torch is never imported on that path,
nor pandas, so Pillow, numpy and onnxruntime suffice (docs/deploy.md).
Files that are not decodable images are reported, on stderr and as CSV rows with an error, and do
not stop the run.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from tlpipe.io import atomic_path, read_json
from tlpipe.paths import MODELS
from tlpipe.pixels import IMAGE_EXTENSIONS, check_image, load_eval_pixels
from tlpipe.runtime import TlpipeError, inference_batch_size, workers


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


def _loader(paths: list[Path], geometry: dict, dev):
    import torch

    from tlpipe.images import eval_images

    return torch.utils.data.DataLoader(eval_images(paths, geometry), batch_size=inference_batch_size(dev),
                                       num_workers=workers())


def head_proba(paths: list[Path], models: Path = MODELS, tta: str = "none") -> tuple[np.ndarray, list[str]]:
    from safetensors.torch import load_file

    from tlpipe import backbones, inference, linear
    from tlpipe.runtime import device

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
    return (sum(proba) / len(proba)).numpy(), cfg["classes"]


def finetuned_proba(paths: list[Path], models: Path = MODELS, tta: str = "none") -> tuple[np.ndarray, list[str]]:
    from tlpipe import inference
    from tlpipe.models import load_classifier
    from tlpipe.runtime import device

    model, cfg = load_classifier(models / "finetuned.safetensors", models / "finetuned.json")
    dev = device()
    record = cfg["preprocessing"]
    return inference.class_probabilities(model, _loader(paths, record, dev), record["mean"], record["std"], dev,
                                         tta, desc="fine-tuned").numpy(), cfg["classes"]


def onnx_proba(model, paths: list[Path], tta: str = "none") -> tuple[np.ndarray, list[str]]:
    """`model`: a tlpipe.onnx_model.OnnxModel. Decoded and run one batch at a time; with tta "flip",
    averaged with the mirror image's probabilities, as inference.class_probabilities does."""
    batch, chunks = inference_batch_size(), []
    for lo in range(0, len(paths), batch):
        pixels = np.stack([load_eval_pixels(p, model.preprocessing) for p in paths[lo:lo + batch]])
        proba = model.proba(pixels)
        if tta == "flip":
            proba = (proba + model.proba(pixels[..., ::-1])) / 2
        chunks.append(proba)
    return np.concatenate(chunks), model.classes


def predict(inputs: list[str], model: str, top_k: int, out: Path, models: Path = MODELS,
            tta: str = "none") -> list[dict]:
    """`model`: head, finetuned, or the path of a .onnx file."""
    files = collect(inputs)
    if not files:
        raise TlpipeError("no image files found in " + ", ".join(inputs))
    onnx = None
    if model.endswith(".onnx"):
        from tlpipe.onnx_model import OnnxModel

        onnx = OnnxModel(model)  # a bad model file fails before any image is read
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise TlpipeError(f"--model {model} needs torch (pip install tlpipe); a runtime without it "
                              "takes an exported .onnx file (docs/deploy.md)") from None
    errors = {}
    for path in files:
        reason = "no such file" if not path.exists() else check_image(path)
        if reason:
            errors[path] = reason
            print(f"error: {path}: {reason}", file=sys.stderr)
    good = [p for p in files if p not in errors]
    proba, classes = (None, [])
    if good:
        if onnx is not None:
            proba, classes = onnx_proba(onnx, good, tta)
        else:
            proba, classes = (head_proba if model == "head" else finetuned_proba)(good, models, tta)
    k = min(top_k, len(classes)) if classes else top_k
    rows, good_index = [], {p: i for i, p in enumerate(good)}
    for path in files:
        row = {"path": str(path)}
        if path in good_index:
            p = proba[good_index[path]]
            for rank, idx in enumerate(np.argsort(-p, kind="stable")[:k]):
                row[f"label_{rank + 1}"] = classes[int(idx)]
                row[f"prob_{rank + 1}"] = round(float(p[idx]), 6)
        row["error"] = errors.get(path, "")
        rows.append(row)
    columns = ["path"] + [c for r in range(1, k + 1) for c in (f"label_{r}", f"prob_{r}")] + ["error"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(good)} images predicted with the {model} model, {len(errors)} errors -> {out}")
    return rows
