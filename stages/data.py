"""data: ingest labelled images, check every file, write a stratified train/val/test manifest.

Outputs (data/prepared/): manifest.csv (path relative to the image root, label, split, sha256),
source.json (the image root: data.root, the extracted archive, or images/ for the built-in digits,
the one source written here), classes.json, skipped.csv (file, reason), duplicates.csv (images whose
bytes are identical to another's: sha256, path, label, split, across_splits); metrics/data.json counts.

No copy of the images: DVC hashes data.root as this stage's dependency, so a changed, added or
removed image reruns it, and the manifest's sha256 of every file is what each reader checks the
bytes it opens against (a file changed behind DVC's back is refused, never silently used).
"""

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from tlpipe.ingest import sources
from tlpipe.io import atomic_dir, sha256_file, write_json
from tlpipe.manifest import SOURCE_RECORD
from tlpipe.params import load_params
from tlpipe.paths import DATA_METRICS as METRICS, DOWNLOADS, PREPARED
# tlpipe.ingest.pixels (PIL), not tlpipe.ingest.images: this stage needs no torch, whose import alone takes
# longer than the stage works on the default digits
from tlpipe.ingest.pixels import check_image, shown
from tlpipe.runtime import TlpipeError, progress, run_stage, workers

SHOWN_SKIPS = 20  # skipped files named on the terminal; skipped.csv lists every one


def check_all(items: list[sources.Item], root: Path) -> list[str | None]:
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


def check_classes(items: list[sources.Item], reasons: list[str | None], split: list[sources.Item]) -> None:
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


def report_skipped(skipped: list) -> None:
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


def main() -> None:
    params = load_params("data")
    data = params.data
    seed = params.seed
    val_fraction, test_fraction, on_bad_file = data.val_fraction, data.test_fraction, data.on_bad_file

    with atomic_dir(PREPARED) as out:
        images = out / "images"
        items, root = sources.collect(data, images, DOWNLOADS)
        # Fractions that leave a class without a training image fail now, not after the decode check.
        sources.stratified_split(items, val_fraction, test_fraction, seed)
        reasons = check_all(items, root)
        skipped = [(i, r) for i, r in zip(items, reasons) if r is not None]
        if skipped and on_bad_file == "fail":
            item, reason = skipped[0]
            raise TlpipeError(f"{shown(item.src)}: {reason} ({len(skipped)} bad file(s) in all; "
                              f"set data.on_bad_file: skip to skip and report them)")
        report_skipped(skipped)
        usable = [i for i, r in zip(items, reasons) if r is None]
        if not usable:
            raise TlpipeError("no usable images in the source")
        split = sources.stratified_split(usable, val_fraction, test_fraction, seed)
        check_classes(items, reasons, split)  # first: a class lost to bad files is the better message
        classes = sorted({i.label for i in split})
        if len(classes) < 2:
            raise TlpipeError(f"only one class ({classes[0]!r}) found; classification needs two or more")

        rows = [(i.rel, i.label, i.split, sha256_file(i.src)) for i in progress(split, desc="sha256")]
        for item, _ in skipped:
            if item.src.is_relative_to(images):  # a written source (digits) keeps only usable files
                item.src.unlink()
        # Where the manifest's paths are: under the project (PREPARED/images) or data.root as given
        write_json(out / SOURCE_RECORD, {"root": str(PREPARED / root.relative_to(out)
                                                     if root.is_relative_to(out) else root)})
        manifest = pd.DataFrame(rows, columns=["path", "label", "split", "sha256"])
        manifest.to_csv(out / "manifest.csv", index=False)
        write_json(out / "classes.json", classes)
        pd.DataFrame([(shown(i.src), r) for i, r in skipped], columns=["file", "reason"]).to_csv(
            out / "skipped.csv", index=False)
        dup = duplicates(manifest)
        dup.to_csv(out / "duplicates.csv", index=False)

    counts = manifest.groupby("split").size()
    leaking = dup[dup["across_splits"]]
    write_json(METRICS, {
        "files": len(items),
        "skipped": len(skipped),
        "classes": len(classes),
        **{f"{s}_images": int(counts.get(s, 0)) for s in sources.SPLITS},
        # distinct contents that occur more than once: in two or more splits / within one split
        "duplicates_across_splits": int(leaking["sha256"].nunique()),
        "duplicates_within_split": int(dup[~dup["across_splits"]]["sha256"].nunique()),
        "duplicates_label_conflicts": int(dup.groupby("sha256")["label"].nunique().gt(1).sum()),
    })
    print(f"{len(manifest)} images in {len(classes)} classes "
          f"({', '.join(f'{s} {int(counts.get(s, 0))}' for s in sources.SPLITS)}); "
          f"{len(skipped)} skipped")
    if len(leaking):
        # Name the splits each copy spans: train/val copies bias choices, copies into test inflate scores.
        spans = leaking.groupby("sha256")["split"].agg(lambda s: "/".join(sorted(set(s)))).value_counts()
        print(f"warning: {leaking['sha256'].nunique()} image(s) have identical copies in more than one split "
              f"({', '.join(f'{n} {splits}' for splits, n in sorted(spans.items()))}; e.g. "
              f"{', '.join(leaking['path'].head(2))}): "
              f"{'train/test leakage' if spans.index.str.contains('test').any() else 'val-based choices are optimistic'}"
              f"; listed in {PREPARED / 'duplicates.csv'}")
    conflicts = dup.groupby("sha256").filter(lambda g: g["label"].nunique() > 1)
    if len(conflicts):
        # The example pair: two copies of the first conflicting image that carry different labels.
        pair = conflicts[conflicts["sha256"] == conflicts["sha256"].iloc[0]].drop_duplicates("label").head(2)
        print(f"warning: {conflicts['sha256'].nunique()} image(s) are copies carrying different labels (label "
              f"conflicts), e.g. {', '.join(f'{r.path} ({r.label})' for r in pair.itertuples())}")

if __name__ == "__main__":
    run_stage(main)
