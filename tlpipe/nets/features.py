"""Cached backbone features ("CNN codes"): one safetensors file per split, plus shared metadata.

Each split file holds `features` (N x D), `labels` (N int64 class indices) and `ids`
(N int64 row numbers in the manifest); its header carries the metadata as JSON, the same that
`meta.json` holds, so a file copied on its own still says what produced it.

Features are computed in float32 and stored as float16 (`stored`: half the bytes; float16 keeps 11
significant bits, a relative rounding of at most 2^-11 = 0.05 %, far below what JPEG crops change, and the
head's predictions were the same on hymenoptera and sign-digits: docs/sharing.md#disk); a tensor with a
value beyond float16's range (65,504) stays float32. Every reader gets float32 back (`loaded`).

The metadata's PROVENANCE_KEYS, the features' provenance, say what the features are features *of*:
the backbone and its weights (`weights_source`: where the weights came from), the classes, and the
preprocessing record. Both model configs (head.json, finetuned.json) carry the same keys
(`provenance_of`), and `check_provenance` is the one check that a model meets the inputs it was made
for. ("source" alone means the data source, params.yaml's `data.source`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from tlpipe.io import atomic_path, check_finite, read_json, verify_sha256
from tlpipe.paths import FEATURES
from tlpipe.runtime import TlpipeError

PROVENANCE_KEYS = ("backbone", "weights_source", "weights_file", "weights_sha256", "feature_dim", "classes",
                   "preprocessing")


def provenance_of(meta: dict) -> dict:
    """The part of the features metadata a model trained on them records, verbatim."""
    return {key: meta[key] for key in PROVENANCE_KEYS}


def check_provenance(where: str | Path, found: dict, expected: dict, fix: str) -> None:
    """`found` (an artifact's metadata or a model config) must have the same provenance as `expected`."""
    for key in PROVENANCE_KEYS:
        if found.get(key) != expected.get(key):
            raise TlpipeError(f"{where}: made from {key}={found.get(key)!r}, but the current features "
                              f"have {expected.get(key)!r}; {fix}")


STORED_DTYPE = torch.float16
STORED_LIMIT = 65520.0  # float16 rounds a magnitude from here up to inf (its largest finite is 65,504)


def stored(t: torch.Tensor) -> torch.Tensor:
    """A finite float32 features tensor as it is written: float16 (round to nearest), unless a value is
    beyond float16's range (it would become inf): then float32, as computed. Deterministic, like the
    features."""
    if not t.is_floating_point():
        return t.contiguous()
    if t.numel():
        lo, hi = torch.aminmax(t)  # one vectorized pass (float16 has no fast isfinite on the CPU)
        if max(-float(lo), float(hi)) >= STORED_LIMIT:
            return t.contiguous()
    return t.to(STORED_DTYPE).contiguous()


def loaded(t: torch.Tensor) -> torch.Tensor:
    """A stored features tensor as every consumer computes with it: float32."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


def save_split(folder: Path, split: str, features: torch.Tensor, labels: torch.Tensor,
               ids: torch.Tensor, meta: dict) -> None:
    with atomic_path(folder / f"{split}.safetensors") as tmp:
        save_file({"features": stored(features), "labels": labels.contiguous(),
                   "ids": ids.contiguous()}, str(tmp), metadata={"tlpipe": json.dumps(meta, sort_keys=True)})


def load_split(split: str, folder: Path = FEATURES) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one split, checked against the folder's meta.json."""
    path = folder / f"{split}.safetensors"
    try:
        meta = read_json(folder / "meta.json")
        # DVC trusts mtimes: a file altered in place with its mtime kept would be used as it is.
        verify_sha256(path, meta.get("files", {}).get(path.name), folder / "meta.json", "features")
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("tlpipe", "{}"))
        tensors = load_file(str(path))
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the features stage first (dvc repro features)") from None
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as e:
        raise TlpipeError(f"{path}: unreadable features ({e}); rerun the features stage") from None
    for key in PROVENANCE_KEYS:
        if header.get(key) != meta.get(key):
            raise TlpipeError(f"{path}: metadata {key!r} disagrees with {folder / 'meta.json'} "
                              "(features from different runs mixed?); rerun the features stage")
    if set(tensors) != {"features", "labels", "ids"}:
        raise TlpipeError(f"{path}: holds {sorted(tensors)}, not features, labels and ids")
    n = tensors["features"].shape[0]
    if tensors["features"].shape[1:] != (meta["feature_dim"],) or len(tensors["labels"]) != n:
        raise TlpipeError(f"{path}: tensor shapes do not match its metadata")
    check_finite(path, tensors)
    tensors["features"] = loaded(tensors["features"])
    return tensors, meta
