"""ONNX export of a trained classifier, checked against PyTorch before it is kept.

The exported graph takes uint8 N x 3 x S x S pixels (what tlpipe.ingest.pixels decodes, and what the decode
stage stores) and returns calibrated class probabilities, softmax(logits / T) with the model's
temperature T (tlpipe.nets.calibration; T = 1 where none could be fitted, with `calibrated` "false" and
the reason in the metadata), and the raw logits: normalization, temperature and softmax are
inside, so a runtime needs only Pillow, numpy and onnxruntime (tlpipe.deploy.onnx_model, docs/deploy.md) and
gets the probabilities `tlpipe predict` and evaluate report. Batch size is dynamic.

Parity: onnxruntime (CPU) against the PyTorch path of `tlpipe predict` (tlpipe.nets.inference.outputs on
the CPU, then tlpipe.nets.calibration) on the decoded test images; the file is renamed into place only
when the model's largest probability difference (softmax of the logits) is at most TOLERANCE and
every argmax agrees. The file is sealed (tlpipe.deploy.onnx_model.seal: its own sha256 in its metadata),
so every reader refuses it once altered; metrics/export_*.json keeps the sha256 of the file as
written beside the parity numbers. The calibrated difference is reported beside it, not gated: a
temperature T < 1 multiplies the same float32 logit noise by 1/T (up to 4x at calibration.T_RANGE's
lower bound), so gating on it would fail sharply calibrated models whose file is as faithful as any other.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlpipe import preprocessing
from tlpipe.deploy.onnx_model import INPUT, LOGITS, OUTPUT, SEAL_KEY, UNSEALED, OnnxModel, seal
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.nets import calibration, inference
from tlpipe.runtime import TlpipeError, inference_batch_size

OPSET = 17
TOLERANCE = 1e-4  # largest |probability difference| allowed between onnxruntime and PyTorch


class Deployable(nn.Module):
    """uint8 pixels -> (calibrated class probabilities, logits): a classifier with its input
    normalization, its temperature and softmax."""

    def __init__(self, model: nn.Module, mean, std, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (pixels.float() / 255.0 - self.mean) / self.std  # as tlpipe.ingest.images.normalize_batch
        logits = self.model(x)
        return torch.softmax(logits / self.temperature, dim=1), logits


def to_onnx(model: nn.Module, record: dict, temperature: float, metadata: dict[str, str], path: Path) -> None:
    deployable = Deployable(model, record["mean"], record["std"], temperature).eval()
    s = record["img_size"]
    example = torch.zeros((2, 3, s, s), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter: it needs only `onnx`, where the dynamo one also needs
        # onnxscript; it still exports these convnets exactly (the parity check below proves it).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(deployable, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT, LOGITS],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}, LOGITS: {0: "batch"}})
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {**metadata, SEAL_KEY: UNSEALED}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path.write_bytes(seal(proto.SerializeToString()))


def parity(model: nn.Module, onnx_file: Path, test: DecodedSplit, record: dict, temperature: float) -> dict:
    """onnxruntime against PyTorch on every test image: the numbers metrics/export_*.json keeps.

    The reference is `tlpipe predict`'s torch path: softmax, then the temperature on its log."""
    batch = inference_batch_size()
    cpu = torch.device("cpu")  # the ONNX file targets CPU runtimes; compare on the same device type
    logits = inference.outputs(model, test.batches(batch), record["mean"], record["std"], cpu,
                               desc="parity: PyTorch")
    reference = calibration.scaled_proba(calibration.logits_of(torch.softmax(logits, dim=1)), temperature).numpy()
    runtime = OnnxModel(onnx_file)
    got, got_logits = (np.concatenate(parts) for parts in zip(*(
        runtime.run(images.numpy()) for images, _ in test.batches(batch))))
    calibrated = np.abs(got.astype(np.float64) - reference)
    mismatches = int((got.argmax(1) != reference.argmax(1)).sum())
    as_trained = np.abs(torch.softmax(torch.from_numpy(got_logits).double(), 1).numpy()
                        - torch.softmax(logits.double(), 1).numpy())
    return {"split": "test", "images": len(test), "temperature": temperature,
            "max_abs_prob_diff": float(as_trained.max()), "mean_abs_prob_diff": float(as_trained.mean()),
            "max_abs_prob_diff_calibrated": float(calibrated.max()),
            "max_abs_logit_diff": float(np.abs(got_logits.astype(np.float64) - logits.double().numpy()).max()),
            "argmax_mismatches": mismatches, "tolerance": TOLERANCE, SEAL_KEY: runtime.sha256}


def export(model: nn.Module, cfg: dict, weights: Path, config: Path, out: Path, metrics: Path,
           test: DecodedSplit, temperature: float, temperature_from: str, calibrated: bool | None = None,
           calibration_reason: str = "") -> dict:
    """Export `model` (loaded from its `weights` file + `config`, eval mode, CPU) with its `temperature` (read
    from `temperature_from`, which also says whether it was fitted and why: `calibrated`,
    `calibration_reason`) to `out`, checked on the decoded `test` split; parity numbers to `metrics`.
    Nothing is written when parity fails."""
    record = cfg["preprocessing"]
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise TlpipeError(f"{temperature_from}: temperature {temperature!r} is not a finite number above 0; "
                          f"rerun the stage that writes it")
    preprocessing.check(record, test.geometry, config, f"rerun the stage that writes {config}")
    if len(test) == 0:
        raise TlpipeError(f"{out}: no test images to check the export on (data.test_fraction is 0)")
    metadata = {"classes": json.dumps(cfg["classes"]), "preprocessing": json.dumps(record),
                "source_model": str(weights), "source_sha256": sha256_file(weights),
                "backbone": cfg["backbone"], "backbone_weights_sha256": cfg["weights_sha256"],
                "temperature": repr(float(temperature)), "temperature_from": temperature_from}
    if calibrated is not None:  # a model recorded before tlpipe said why has only its temperature
        metadata.update(calibrated=str(bool(calibrated)).lower(), calibration_reason=calibration_reason)
    with atomic_path(out) as tmp:
        to_onnx(model, record, temperature, metadata, tmp)
        numbers = parity(model, tmp, test, record, temperature)
        if numbers["max_abs_prob_diff"] > TOLERANCE or numbers["argmax_mismatches"]:
            raise TlpipeError(
                f"{out}: onnxruntime disagrees with PyTorch on the {len(test)} test images (largest "
                f"probability difference {numbers['max_abs_prob_diff']:.2e}, limit {TOLERANCE:.0e}; "
                f"{numbers['max_abs_prob_diff_calibrated']:.2e} at temperature {temperature:.3g}; "
                f"argmax differs on {numbers['argmax_mismatches']}); not written")
        numbers.update(onnx_bytes=tmp.stat().st_size, opset=OPSET, onnx_sha256=sha256_file(tmp))
    write_json(metrics, numbers)
    print(f"{out}: {numbers['onnx_bytes'] / 2**20:.1f} MiB, opset {OPSET}; onnxruntime vs PyTorch on "
          f"{len(test)} test images: largest probability difference {numbers['max_abs_prob_diff']:.1e}, "
          f"argmax identical")
    return numbers
