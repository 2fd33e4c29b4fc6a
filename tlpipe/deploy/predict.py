"""`tlpipe predict`: top-k classes of new images with the head, the fine-tuned model or an ONNX export.

Exactly the evaluation path: the model's preprocessing record (decoding by tlpipe.ingest.pixels, as the
decode stage, then its mean/std); for the head, the backbone's features computed by
`inference.outputs` (what the features stage caches) and then the head's linear layer (what evaluate
applies to the cached test features), on the layers the head reads (tlpipe.nets.layers). With a `.onnx`
file (the export stages' models/*.onnx), the record comes from the file's metadata and onnxruntime
runs it: torch is never imported on that path, nor pandas, so Pillow, numpy and onnxruntime suffice (docs/deploy.md).
Folders are searched like the data stage's class folders (`tlpipe.ingest.pixels.list_files`: every file
but hidden and junk ones, whatever its extension), so predict takes exactly the files training
takes. Each file is decoded once up front as the model's loader will decode it; a file that fails
(not an image, malformed EXIF, a name that is not UTF-8...) is reported, on stderr and as a CSV
row with an error, and does not stop the run. The output path and the model are checked before
any image is decoded.
Probabilities are calibrated: the model's logits divided by its temperature (head.json's, from
out-of-fold logits; finetuned_calibration.json's, from val), as evaluate scores them; an ONNX file
has its temperature inside, and gives the same probabilities. Where no temperature could be fitted
(tlpipe.nets.calibration: too few held-out images or errors) T is 1, and a note on stderr says why.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from tlpipe.ingest.pixels import check_image, eval_check, image_warnings, list_files, load_eval_pixels, shown
from tlpipe.io import atomic_path, check_writable, read_json
from tlpipe.paths import MODELS
from tlpipe.runtime import TlpipeError, inference_batch_size, workers


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
    check_writable("--out", out)


def calibrated(raw: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(raw) / T): the temperature applied to probabilities (tlpipe.nets.calibration, in numpy)."""
    z = np.log(np.clip(raw.astype(np.float64), 1e-300, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TorchModel:
    """The head or the fine-tuned model of models/ as predict uses it: its preprocessing record, classes,
    temperature and calibrated probabilities."""

    def __init__(self, kind: str, models: Path):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise TlpipeError(f"--model {kind} needs torch (pip install tlpipe); a runtime without it "
                              "takes an exported .onnx file (docs/deploy.md)") from None
        from tlpipe.nets import backbones, layers
        from tlpipe.nets.models import load_classifier, load_head

        self.kind = kind
        if kind == "head":
            self.head, cfg = load_head(models / "head.safetensors", models / "head.json")
            self.backbone = backbones.pretrained_for(cfg, str(models / "head.json"))
            self.trunk = layers.for_head(self.backbone.trunk, cfg)
            self.temperature = cfg.get("temperature", 1.0)  # from the out-of-fold logits
            self.calibrated, self.calibration_reason = cfg.get("calibrated"), cfg.get("calibration_reason", "")
        else:
            self.model, cfg = load_classifier(models / "finetuned.safetensors", models / "finetuned.json")
            # the temperature the infer stage fitted on val; without it (infer not run yet), as trained
            calibration = models / "finetuned_calibration.json"
            if not calibration.is_file():
                print(f"note: {calibration} missing (run the infer stage); probabilities are not calibrated",
                      file=sys.stderr)
            fit = read_json(calibration) if calibration.is_file() else {}
            self.temperature = fit["temperature"] if fit else 1.0
            self.calibrated, self.calibration_reason = fit.get("calibrated"), fit.get("calibration_reason", "")
        self.record, self.classes = cfg["preprocessing"], cfg["classes"]

    def proba(self, paths: list[Path], tta: str) -> np.ndarray:
        """Calibrated class probabilities (with tta "flip": of the averaged probabilities)."""
        from tlpipe.nets import calibration

        raw = self.raw_proba(paths, tta)
        return calibration.scaled_proba(calibration.logits_of(raw), self.temperature).float().numpy()

    def raw_proba(self, paths: list[Path], tta: str):
        import torch

        from tlpipe.ingest.images import eval_images
        from tlpipe.nets import inference, linear
        from tlpipe.runtime import device

        record, dev, n_workers = self.record, device(), workers()
        loader = torch.utils.data.DataLoader(eval_images(paths, record), batch_size=inference_batch_size(dev),
                                             num_workers=n_workers, pin_memory=dev.type == "cuda")
        with inference.threads_beside(n_workers, dev):  # the workers decode on cores of their own
            if self.kind == "finetuned":
                return inference.class_probabilities(self.model, loader, record["mean"], record["std"], dev, tta,
                                                     desc="fine-tuned")
            weight, bias = self.head.weight.detach(), self.head.bias.detach()
            trunk = self.trunk  # the layers the head reads (tlpipe.nets.layers.for_head)
            views = [trunk] + ([inference.Mirrored(trunk)] if tta == "flip" else [])
            proba = [linear.predict_proba(inference.outputs(view, loader, record["mean"], record["std"], dev,
                                                            desc="features"), weight, bias) for view in views]
        return sum(proba) / len(proba)


class ExportedModel:
    """A .onnx file of the export stages (tlpipe.deploy.onnx_model), run by onnxruntime without torch."""

    def __init__(self, path: str):
        from tlpipe.deploy.onnx_model import OnnxModel

        self.onnx = OnnxModel(path)  # a bad model file fails before any image is read
        self.record, self.classes = self.onnx.preprocessing, self.onnx.classes
        self.temperature = self.onnx.temperature
        self.calibrated, self.calibration_reason = self.onnx.calibrated, self.onnx.calibration_reason

    def proba(self, paths: list[Path], tta: str) -> np.ndarray:
        """Decoded and run one batch at a time. The file's own output is calibrated already; with tta
        "flip", the two views' probabilities are averaged before the temperature, as the torch path does."""
        batch, chunks = inference_batch_size(), []
        for lo in range(0, len(paths), batch):
            pixels = np.stack([self._pixels(p) for p in paths[lo:lo + batch]])
            if tta == "flip":
                raw = [_softmax(self.onnx.run(view)[1]) for view in (pixels, pixels[..., ::-1])]
                chunks.append(calibrated((raw[0] + raw[1]) / 2, self.onnx.temperature).astype(np.float32))
            else:
                chunks.append(self.onnx.proba(pixels))
        return np.concatenate(chunks)


    def _pixels(self, path: Path) -> np.ndarray:
        with image_warnings(path):
            return load_eval_pixels(path, self.record)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(inputs: list[str], model: str, top_k: int, out: Path, models: Path = MODELS,
            tta: str = "none") -> list[dict]:
    """`model`: head, finetuned, or the path of a .onnx file."""
    check_output(out)
    files = collect(inputs)
    if not files:
        raise TlpipeError("no files found in " + ", ".join(shown(i) for i in inputs))
    trained = ExportedModel(model) if model.endswith(".onnx") else TorchModel(model, models)
    if trained.calibrated is False:
        print(f"note: the {model} model's probabilities are not calibrated (T = {trained.temperature:g}: "
              f"{trained.calibration_reason}; docs/trust.md)", file=sys.stderr)
    load = eval_check(trained.record)
    errors = {}
    for path in files:
        reason = "no such file" if not path.exists() else check_image(path, load=load)
        if reason:
            errors[path] = reason
            print(f"error: {shown(path)}: {reason}", file=sys.stderr)
    good = [p for p in files if p not in errors]
    proba, classes = (trained.proba(good, tta) if good else None), trained.classes
    if proba is not None and not bool(np.isfinite(proba).all()):
        raise TlpipeError(f"the {model} model gave non-finite probabilities; its weights are damaged")
    k = min(top_k, len(classes))
    rows, good_index = [], {p: i for i, p in enumerate(good)}
    for path in files:
        row = {"path": shown(path)}
        if path in good_index:
            # Ranked by the probabilities as printed, ties in class order: the same CSV from torch and
            # from onnxruntime, whose float32 results differ in digits nobody sees (and underflow apart).
            p = [round(float(x), 6) for x in proba[good_index[path]]]
            for rank, idx in enumerate(sorted(range(len(p)), key=lambda i: -p[i])[:k]):
                row[f"label_{rank + 1}"] = classes[idx]
                row[f"prob_{rank + 1}"] = p[idx]
        row["error"] = errors.get(path, "")
        rows.append(row)
    columns = ["path"] + [c for r in range(1, k + 1) for c in (f"label_{r}", f"prob_{r}")] + ["error"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(good)} images predicted with the {model} model, {len(errors)} errors -> {out}")
    return rows
