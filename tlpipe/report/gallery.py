"""A gallery of the test images a model gets wrong: thumbnail, true and predicted label, confidence.

Drawn from the evaluate stage's per-image predictions (path, actual, predicted, confidence), the
most confident mistakes first: those are the ones worth a look (label noise, confusable classes).
matplotlib's object API (Figure, no pyplot) needs no display and no global backend switch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from tlpipe.ingest.pixels import image_warnings, load_rgb
from tlpipe.io import atomic_path
from tlpipe.manifest import image_root

MAX_IMAGES = 40  # a bounded PNG: the gallery is git-tracked, one per model and experiment
COLUMNS = 8
THUMB = 96


def mistakes(table: pd.DataFrame) -> pd.DataFrame:
    """The misclassified rows, most confident first."""
    wrong = table[table["actual"] != table["predicted"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable")


def write(predictions_csv: Path, out: Path, title: str, images: Path | None = None,
          max_images: int = MAX_IMAGES, hashes: dict[str, str] | None = None) -> int:
    """Draw the gallery of `predictions_csv` into the PNG `out`; return how many images are wrong.
    `hashes`: the manifest's sha256 by path, which each image's bytes are checked against."""
    table = pd.read_csv(predictions_csv, dtype={"actual": str, "predicted": str}, keep_default_na=False)
    wrong = mistakes(table)
    shown = wrong.head(max_images)
    header = f"{title}: {len(wrong)} of {len(table)} test images wrong"
    if len(shown) < len(wrong):
        header += f" (the {len(shown)} most confident shown)"
    captions = [f"true {r.actual}\npred {r.predicted} ({r.confidence:.2f})" for r in shown.itertuples()]
    draw(list(shown["path"]), captions, out, header, images, hashes)
    return len(wrong)


def draw(paths: list[str], captions: list[str], out: Path, header: str, images: Path | None = None,
         hashes: dict[str, str] | None = None) -> None:
    """A grid of thumbnails of `paths` (relative to `images`), each with its caption, into the PNG `out`;
    with `hashes` (the manifest's sha256 by path), each file's bytes checked first. `images` defaults
    to the data stage's image root (tlpipe.manifest.image_root)."""
    images = image_root() if images is None else images
    if not paths:
        fig = Figure(figsize=(5, 1))
        fig.text(0.5, 0.5, header, ha="center", va="center")
    else:
        cols = min(COLUMNS, len(paths))
        rows = math.ceil(len(paths) / cols)
        fig = Figure(figsize=(max(1.7 * cols, 6.0), 2.0 * rows + 0.4))  # wide enough for the title
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, path, caption in zip(axes.flat, paths, captions):
            with image_warnings(images / path):
                img = load_rgb(images / path, (hashes or {}).get(path))
            img.thumbnail((THUMB, THUMB))
            ax.imshow(img)
            ax.set_title(caption, fontsize=7, color="darkred")
        fig.suptitle(header, fontsize=9)
        fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
