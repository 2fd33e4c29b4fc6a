"""Reading the data stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tlpipe.paths import PREPARED
from tlpipe.runtime import TlpipeError


def read_manifest(prepared: Path = PREPARED) -> tuple[pd.DataFrame, list[str]]:
    """The manifest (path, label, split, sha256) with a `target` class index, and the class list."""
    try:
        manifest = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
        classes = json.loads((prepared / "classes.json").read_text())
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the data stage first (dvc repro data)") from None
    index = {c: i for i, c in enumerate(classes)}
    manifest["target"] = manifest["label"].map(index).astype("int64")
    return manifest, classes


def image_paths(manifest: pd.DataFrame, prepared: Path = PREPARED) -> list[Path]:
    return [prepared / "images" / p for p in manifest["path"]]
