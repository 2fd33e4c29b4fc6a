"""ONNX export of a trained classifier, checked against PyTorch before it is kept.

The exported graph takes uint8 N x 3 x S x S pixels (what tlpipe.pixels decodes, and what the decode
stage stores) and returns class probabilities: normalization and softmax are inside, so a runtime
needs only Pillow, numpy and onnxruntime (tlpipe.onnx_model, docs/deploy.md). Batch size is dynamic.

Parity: onnxruntime (CPU) against the PyTorch evaluation path (tlpipe.inference.outputs, on the CPU)
on the decoded test images; the file is renamed into place only when the largest probability
difference is at most TOLERANCE and every argmax agrees.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlpipe import inference, preprocessing
from tlpipe.decoded import DecodedSplit
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.onnx_model import INPUT, OUTPUT, OnnxModel
from tlpipe.runtime import TlpipeError, inference_batch_size

OPSET = 17
TOLERANCE = 1e-4  # largest |probability difference| allowed between onnxruntime and PyTorch


class Deployable(nn.Module):
    """uint8 pixels -> class probabilities: a classifier with its input normalization and softmax."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255.0 - self.mean) / self.std  # as tlpipe.images.normalize_batch
        return torch.softmax(self.model(x), dim=1)


def to_onnx(model: nn.Module, record: dict, metadata: dict[str, str], path: Path) -> None:
    deployable = Deployable(model, record["mean"], record["std"]).eval()
    s = record["img_size"]
    example = torch.zeros((2, 3, s, s), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter: it needs only `onnx`, where the dynamo one also needs
        # onnxscript; it still exports these convnets exactly (the parity check below proves it).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(deployable, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parity(model: nn.Module, onnx_file: Path, test: DecodedSplit, record: dict) -> dict:
    """onnxruntime against PyTorch on every test image: the numbers metrics/export_*.json keeps."""
    batch = inference_batch_size()
    cpu = torch.device("cpu")  # the ONNX file targets CPU runtimes; compare on the same device type
    reference = torch.softmax(inference.outputs(model, test.batches(batch), record["mean"], record["std"],
                                                cpu, desc="parity: PyTorch"), dim=1).numpy()
    runtime = OnnxModel(onnx_file)
    got = np.concatenate([runtime.proba(images.numpy()) for images, _ in test.batches(batch)])
    diff = np.abs(got.astype(np.float64) - reference)
    mismatches = int((got.argmax(1) != reference.argmax(1)).sum())
    return {"split": "test", "images": len(test), "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()), "argmax_mismatches": mismatches,
            "tolerance": TOLERANCE}


def export(model: nn.Module, cfg: dict, source: Path, config: Path, out: Path, metrics: Path,
           test: DecodedSplit) -> dict:
    """Export `model` (loaded from `source` + `config`, eval mode, CPU) to `out`, checked on the
    decoded `test` split; parity numbers to `metrics`. Nothing is written when parity fails."""
    record = cfg["preprocessing"]
    preprocessing.check(record, test.geometry, config, f"rerun the stage that writes {config}")
    if len(test) == 0:
        raise TlpipeError(f"{out}: no test images to check the export on (data.test_fraction is 0)")
    metadata = {"classes": json.dumps(cfg["classes"]), "preprocessing": json.dumps(record),
                "source_model": str(source), "source_sha256": sha256_file(source),
                "backbone": cfg["backbone"], "backbone_weights_sha256": cfg["weights_sha256"]}
    with atomic_path(out) as tmp:
        to_onnx(model, record, metadata, tmp)
        numbers = parity(model, tmp, test, record)
        if numbers["max_abs_prob_diff"] > TOLERANCE or numbers["argmax_mismatches"]:
            raise TlpipeError(
                f"{out}: onnxruntime disagrees with PyTorch on the {len(test)} test images (largest "
                f"probability difference {numbers['max_abs_prob_diff']:.2e}, limit {TOLERANCE:.0e}; "
                f"argmax differs on {numbers['argmax_mismatches']}); not written")
        numbers.update(onnx_bytes=tmp.stat().st_size, opset=OPSET)
    write_json(metrics, numbers)
    print(f"{out}: {numbers['onnx_bytes'] / 2**20:.1f} MiB, opset {OPSET}; onnxruntime vs PyTorch on "
          f"{len(test)} test images: largest probability difference {numbers['max_abs_prob_diff']:.1e}, "
          f"argmax identical")
    return numbers
