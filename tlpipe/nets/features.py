"""Cached backbone features ("CNN codes"): one safetensors file per split, plus shared metadata.

Each split file holds `features` (N x D float32), `labels` (N int64 class indices) and `ids`
(N int64 row numbers in the manifest); its header carries the metadata as JSON, the same that
`meta.json` holds, so a file copied on its own still says what produced it.

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


def save_split(folder: Path, split: str, features: torch.Tensor, labels: torch.Tensor,
               ids: torch.Tensor, meta: dict) -> None:
    with atomic_path(folder / f"{split}.safetensors") as tmp:
        save_file({"features": features.contiguous(), "labels": labels.contiguous(),
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
    return tensors, meta
