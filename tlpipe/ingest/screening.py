"""The data stage's screening of a source: every file decoded once, the classes that keep a
training image, the skipped files reported, and byte-identical copies found.

No torch (tlpipe.ingest.pixels reads with PIL): the data stage imports this, and torch's import
alone takes longer than the stage's work on the default digits.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from tlpipe.ingest.pixels import check_image, shown
from tlpipe.ingest.sources import Item
from tlpipe.manifest import SPLITS
from tlpipe.paths import PREPARED
from tlpipe.runtime import TlpipeError, progress, workers

SHOWN_SKIPS = 20  # skipped files named on the terminal; skipped.csv lists every one


def check_all(items: list[Item], root: Path) -> list[str | None]:
    """Each item's reason to skip it (None: usable), decoding every file once, in worker processes."""
    paths = [str(i.src) for i in items]
    roots = [str(root)] * len(paths)
    n_workers = workers()
    bar = dict(total=len(paths), desc="decode check")
    if n_workers <= 1:
        reasons = [check_image(path, r) for path, r in progress(zip(paths, roots), **bar)]
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            reasons = list(progress(pool.map(check_image, paths, roots, chunksize=16), **bar))
    # A CSV row's line number goes with its file's reason.
    return [r if r is None or not i.where else f"{r} ({i.where})" for i, r in zip(items, reasons)]


def check_classes(items: list[Item], reasons: list[str | None], split: list[Item]) -> None:
    """Every class the source names keeps at least one usable training image.

    Skipping bad files must not silently drop a class (or leave one the head cannot learn).
    """
    train = {i.label for i in split if i.split == "train"}
    for label in sorted({i.label for i in items} - train):
        mine = [(i, r) for i, r in zip(items, reasons) if i.label == label]
        bad = [(i, r) for i, r in mine if r is not None]
        first = f"; first: {shown(bad[0][0].src)}: {bad[0][1]}" if bad else ""
        raise TlpipeError(f"class {label!r} has no usable training image ({len(mine)} file(s), "
                          f"{len(bad)} unusable{first})")


def report_skipped(skipped: list[tuple[Item, str]]) -> None:
    """The first SHOWN_SKIPS skipped files, one line each, then a count: an archive of 100,000 bad
    members is a summary, not 100,000 lines; skipped.csv lists them all."""
    for item, reason in skipped[:SHOWN_SKIPS]:
        print(f"skipped {shown(item.src)}: {reason}")
    if len(skipped) > SHOWN_SKIPS:
        print(f"... and {len(skipped) - SHOWN_SKIPS} more skipped ({len(skipped)} in all), every one with its "
              f"reason in {PREPARED / 'skipped.csv'}")


def duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images whose bytes equal another image's, each with whether its copies span two splits.

    Copies across splits leak (the same image trained on and scored); copies within one split only
    weigh an image twice. Both are listed; only the first kind is warned about.
    """
    dup = manifest[manifest.duplicated("sha256", keep=False)].copy()
    dup["across_splits"] = dup.groupby("sha256")["split"].transform("nunique") > 1
    return dup.sort_values(["sha256", "path"])[["sha256", "path", "label", "split", "across_splits"]]


def counts(files: int, skipped: int, classes: int, manifest: pd.DataFrame, dup: pd.DataFrame) -> dict:
    """metrics/data.json: files, skips, images per split and the duplicates by kind."""
    per_split = manifest.groupby("split").size()
    return {
        "files": files,
        "skipped": skipped,
        "classes": classes,
        **{f"{s}_images": int(per_split.get(s, 0)) for s in SPLITS},
        # distinct contents that occur more than once: in two or more splits / within one split
        "duplicates_across_splits": int(dup[dup["across_splits"]]["sha256"].nunique()),
        "duplicates_within_split": int(dup[~dup["across_splits"]]["sha256"].nunique()),
        "duplicates_label_conflicts": int(dup.groupby("sha256")["label"].nunique().gt(1).sum()),
    }


def duplicate_warnings(dup: pd.DataFrame) -> list[str]:
    """One line for copies across splits (naming the splits each spans: train/val copies bias
    choices, copies into test inflate scores) and one for copies that carry different labels."""
    lines = []
    leaking = dup[dup["across_splits"]]
    if len(leaking):
        spans = leaking.groupby("sha256")["split"].agg(lambda s: "/".join(sorted(set(s)))).value_counts()
        lines.append(f"warning: {leaking['sha256'].nunique()} image(s) have identical copies in more than one split "
                     f"({', '.join(f'{n} {splits}' for splits, n in sorted(spans.items()))}; e.g. "
                     f"{', '.join(leaking['path'].head(2))}): "
                     f"{'train/test leakage' if spans.index.str.contains('test').any() else 'val-based choices are optimistic'}"
                     f"; listed in {PREPARED / 'duplicates.csv'}")
    conflicts = dup.groupby("sha256").filter(lambda g: g["label"].nunique() > 1)
    if len(conflicts):
        # The example pair: two copies of the first conflicting image that carry different labels.
        pair = conflicts[conflicts["sha256"] == conflicts["sha256"].iloc[0]].drop_duplicates("label").head(2)
        lines.append(f"warning: {conflicts['sha256'].nunique()} image(s) are copies carrying different labels (label "
                     f"conflicts), e.g. {', '.join(f'{r.path} ({r.label})' for r in pair.itertuples())}")
    return lines
