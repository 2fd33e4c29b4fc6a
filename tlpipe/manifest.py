"""Reading the data stage's outputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlpipe.io import read_json
from tlpipe.paths import PREPARED
from tlpipe.runtime import TlpipeError

SOURCE_RECORD = "source.json"  # in data/prepared: {"root": the folder the manifest's paths are relative to}
SPLITS = ("train", "val", "test")  # the manifest's `split` values, in the order stages go through them


def read_manifest(prepared: Path = PREPARED) -> tuple[pd.DataFrame, list[str]]:
    """The manifest (path, label, split, sha256) with a `target` class index, and the class list."""
    try:
        manifest = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
        classes = read_json(prepared / "classes.json")
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the data stage first (dvc repro data)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TlpipeError(f"{prepared / 'manifest.csv'}: unreadable ({e}); rerun the data stage".splitlines()[0]) from None
    if not isinstance(classes, list) or not {"path", "label", "split", "sha256"} <= set(manifest.columns):
        raise TlpipeError(f"{prepared}: manifest.csv or classes.json is damaged; rerun the data stage")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(manifest["label"]) - set(index))
    if unknown:
        raise TlpipeError(f"{prepared / 'manifest.csv'}: label {unknown[0]!r} is not in classes.json; "
                          "rerun the data stage")
    manifest["target"] = manifest["label"].map(index).astype("int64")
    return manifest, classes


def image_root(prepared: Path = PREPARED) -> Path:
    """The folder the manifest's paths are relative to: the data stage's record of data.root (or of
    its own images/ folder for a source it writes, and in projects made before source.json)."""
    record = prepared / SOURCE_RECORD
    if not record.exists():
        return prepared / "images"
    try:
        data = read_json(record)
    except (OSError, ValueError):  # a folder, unreadable, not JSON
        data = None
    root = data.get("root") if isinstance(data, dict) else None
    if not isinstance(root, str) or not root:
        raise TlpipeError(f"{record}: damaged (no image root); rerun the data stage")
    return Path(root)


def image_paths(manifest: pd.DataFrame, prepared: Path = PREPARED) -> list[Path]:
    """Where each row's image file is. Read them with their `image_hashes` (tlpipe.ingest.pixels.read_verified)."""
    root = image_root(prepared)
    return [root / p for p in manifest["path"]]


def image_hashes(manifest: pd.DataFrame) -> list[str]:
    """Each row's sha256, as the data stage recorded it: what a reader of the file checks its bytes against."""
    return list(manifest["sha256"])


def hashes_by_path(manifest: pd.DataFrame) -> dict[str, str]:
    return dict(zip(manifest["path"], manifest["sha256"]))
