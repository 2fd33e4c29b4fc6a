"""data: ingest labelled images, check every file, write a stratified train/val/test manifest.

Outputs (data/prepared/): manifest.csv (path relative to the image root, label, split, sha256),
source.json (the image root: data.root, the extracted archive, or images/ for the built-in digits,
the one source written here), classes.json, skipped.csv (file, reason), duplicates.csv (images whose
bytes are identical to another's: sha256, path, label, split, across_splits); metrics/data.json counts.

No copy of the images: DVC hashes data.root as this stage's dependency, so a changed, added or
removed image reruns it, and the manifest's sha256 of every file is what each reader checks the
bytes it opens against (a file changed behind DVC's back is refused, never silently used).
"""

import pandas as pd

from tlpipe.ingest import screening, sources
# tlpipe.ingest.pixels (PIL), not tlpipe.ingest.images: this stage needs no torch, whose import alone takes
# longer than the stage works on the default digits
from tlpipe.ingest.pixels import shown
from tlpipe.io import atomic_dir, sha256_file, write_json
from tlpipe.manifest import SOURCE_RECORD
from tlpipe.params import load_params
from tlpipe.paths import DATA_METRICS as METRICS, DOWNLOADS, PREPARED
from tlpipe.runtime import TlpipeError, progress, run_stage


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
        reasons = screening.check_all(items, root)
        skipped = [(i, r) for i, r in zip(items, reasons) if r is not None]
        if skipped and on_bad_file == "fail":
            item, reason = skipped[0]
            raise TlpipeError(f"{shown(item.src)}: {reason} ({len(skipped)} bad file(s) in all; "
                              f"set data.on_bad_file: skip to skip and report them)")
        screening.report_skipped(skipped)
        usable = [i for i, r in zip(items, reasons) if r is None]
        if not usable:
            raise TlpipeError("no usable images in the source")
        split = sources.stratified_split(usable, val_fraction, test_fraction, seed)
        screening.check_classes(items, reasons, split)  # first: a class lost to bad files is the better message
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
        dup = screening.duplicates(manifest)
        dup.to_csv(out / "duplicates.csv", index=False)

    write_json(METRICS, screening.counts(len(items), len(skipped), len(classes), manifest, dup))
    per_split = manifest.groupby("split").size()
    print(f"{len(manifest)} images in {len(classes)} classes "
          f"({', '.join(f'{s} {int(per_split.get(s, 0))}' for s in sources.SPLITS)}); "
          f"{len(skipped)} skipped")
    for line in screening.duplicate_warnings(dup):
        print(line)


if __name__ == "__main__":
    run_stage(main)
