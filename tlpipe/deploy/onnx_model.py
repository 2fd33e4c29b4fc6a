"""A model exported by the export stages, run by onnxruntime: numpy in, numpy out, no torch.

The file's contract (tlpipe.deploy.export writes it): input `pixels`, uint8 N x 3 x S x S at the record's
img_size, decoded by tlpipe.ingest.pixels; outputs `probabilities`, float32 N x classes, calibrated
(softmax(logits / T), T the model's fitted temperature), and `logits`, float32 N x classes;
metadata_props `classes` (JSON list), `preprocessing` (the JSON preprocessing record,
tlpipe.preprocessing), `temperature` (T, already applied to `probabilities`), `source_sha256` (the
safetensors file it was exported from) and `tlpipe_sha256`, the file's seal; optionally `calibrated`
("true" or "false": whether T was fitted or is 1 for want of held-out evidence) and
`calibration_reason`. Anything else is refused in one line.

The seal: the sha256 of the whole file as written with 64 zeros in place of the seal's own value
(`seal`). Checking it (`check_seal`) needs neither `onnx` nor torch, only the bytes: any change to
the file after export (a negated weight tensor, one flipped byte, an edited temperature) is refused
before onnxruntime parses it, where a damaged but loadable model would otherwise predict nonsense.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tlpipe.ingest.pixels import not_regular
from tlpipe.preprocessing import KEYS
from tlpipe.runtime import TlpipeError

INPUT, OUTPUT, LOGITS = "pixels", "probabilities", "logits"
SEAL_KEY = "tlpipe_sha256"
UNSEALED = "0" * 64  # the seal's value while the file's digest is taken
REQUIRED_METADATA = ("classes", "preprocessing", "temperature", "source_sha256", SEAL_KEY)
# The seal's metadata entry as protobuf serializes it (StringStringEntryProto: field 1 the key,
# field 2 the value, each tag, length, bytes), followed by its 64 hex digits.
_SEAL_ENTRY = b"\x0a" + bytes([len(SEAL_KEY)]) + SEAL_KEY.encode() + b"\x12\x40"


def seal(raw: bytes) -> bytes:
    """A serialized model whose SEAL_KEY entry holds UNSEALED, with the sha256 of those bytes in its place."""
    at = raw.find(_SEAL_ENTRY + UNSEALED.encode())
    if at < 0 or raw.find(_SEAL_ENTRY, at + 1) >= 0:
        raise ValueError(f"expected one {SEAL_KEY} entry holding {UNSEALED[:8]}...")
    start = at + len(_SEAL_ENTRY)
    return raw[:start] + hashlib.sha256(raw).hexdigest().encode() + raw[start + 64:]


def check_seal(path: Path, raw: bytes) -> str | None:
    """The seal's value after checking it against the bytes `raw` of `path`; None if it has none."""
    at = raw.find(_SEAL_ENTRY)
    if at < 0:
        return None
    start = at + len(_SEAL_ENTRY)
    recorded = raw[start:start + 64].decode("ascii", "replace")
    got = hashlib.sha256(raw[:start] + UNSEALED.encode() + raw[start + 64:]).hexdigest()
    if got != recorded:
        raise TlpipeError(f"{path}: sha256 {got[:12]} is not the {recorded[:12]} sealed in it at export: the "
                          "file was altered after it was written; export it again (dvc repro --force "
                          "export_head or export_finetuned)")
    return recorded


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class OnnxModel:
    def __init__(self, path: str | Path, threads: int | None = None):
        """`threads`: onnxruntime's intra-op threads (default: its own, one per physical core)."""
        self.path = path = Path(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise TlpipeError("onnxruntime is not installed: pip install onnxruntime (docs/deploy.md)") from None
        try:
            kind = not_regular(path.stat().st_mode)
        except FileNotFoundError:
            raise TlpipeError(f"{path}: no such file") from None
        except OSError as e:
            raise TlpipeError(f"{path}: cannot read ({e.strerror or e})") from None
        if kind:
            raise TlpipeError(f"{path}: {kind}, not an ONNX file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise TlpipeError(f"{path}: cannot read ({e.strerror or e})") from None
        self.sha256 = check_seal(path, raw)  # before onnxruntime parses a byte of it
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings would interleave with our output
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, InvalidGraph, ...)
            raise TlpipeError(f"{path}: not a loadable ONNX model ({_first_line(e)})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise TlpipeError(f"{path}: not a tlpipe export (its metadata has no {', '.join(missing)}); "
                              "export it with `dvc repro export_head export_finetuned`")
        try:
            self.classes = json.loads(meta["classes"])
            self.preprocessing = json.loads(meta["preprocessing"])
        except json.JSONDecodeError as e:
            raise TlpipeError(f"{path}: metadata is not valid JSON ({e})") from None
        try:
            self.temperature = float(meta["temperature"])
        except ValueError:
            self.temperature = float("nan")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise TlpipeError(f"{path}: metadata 'temperature' is {meta['temperature']!r}, not a number above 0")
        self.source_sha256 = meta["source_sha256"]
        # None for files exported before tlpipe recorded whether T was fitted
        self.calibrated = {"true": True, "false": False}.get(meta.get("calibrated", ""))
        self.calibration_reason = meta.get("calibration_reason", "")
        self._check_signature()

    def _check_signature(self) -> None:
        where = self.path
        if not (isinstance(self.classes, list) and self.classes and all(isinstance(c, str) for c in self.classes)):
            raise TlpipeError(f"{where}: metadata 'classes' is not a list of class names")
        if not isinstance(self.preprocessing, dict) or set(KEYS) - set(self.preprocessing):
            raise TlpipeError(f"{where}: metadata 'preprocessing' lacks keys of {', '.join(KEYS)}")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        s = self.preprocessing["img_size"]
        if ([i.name for i in inputs] != [INPUT] or inputs[0].type != "tensor(uint8)"
                or list(inputs[0].shape[1:]) != [3, s, s]):
            raise TlpipeError(f"{where}: expected one input '{INPUT}', uint8 N x 3 x {s} x {s}")
        shapes = {o.name: o.shape for o in outputs}
        for name in (OUTPUT, LOGITS):
            if name not in shapes or shapes[name][1:] != [len(self.classes)]:
                raise TlpipeError(f"{where}: expected an output '{name}' of N x {len(self.classes)} "
                                  "(one value per class)")

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N x 3 x S x S -> (calibrated probabilities, logits), float32 N x classes each."""
        proba, logits = self.session.run([OUTPUT, LOGITS], {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})
        return proba, logits

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x S x S -> calibrated probabilities, float32 N x classes."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
