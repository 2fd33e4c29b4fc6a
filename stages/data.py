"""data: ingest labelled images, check every file, write a stratified train/val/test manifest.

Outputs (data/prepared/): images/ (the usable files, byte-for-byte copies), manifest.csv
(path, label, split, sha256), classes.json, skipped.csv (file, reason); metrics/data.json counts.
"""

import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from tlpipe import sources
from tlpipe.images import check_image
from tlpipe.io import atomic_dir, sha256_file, write_json
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, progress_enabled, run_stage, workers

PREPARED = Path("data/prepared")
DOWNLOADS = Path("data/downloads")
METRICS = Path("metrics/data.json")


def write_digits(folder: Path) -> list[sources.Item]:
    """scikit-learn's 1797 bundled 8x8 digit scans (values 0..16) as 8-bit grayscale PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    items = []
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        rel = f"digits/{target}/{i:04d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        scaled = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(scaled, "L").save(folder / rel)
        items.append(sources.Item(folder / rel, rel, str(target)))
    return items


def collect(p, images: Path) -> list[sources.Item]:
    source, root = p.source, Path(p.root)
    csv_file, file_column, label_column = p.csv_file, p.file_column, p.label_column
    url, sha256, layout = p.url, p.sha256, p.archive_layout
    if source == "digits":
        return write_digits(images)
    if source == "url":
        archive = sources.download(url, sha256, DOWNLOADS)
        root = sources.extract(archive, DOWNLOADS / sha256)
        source = layout
    if source == "folder":
        return sources.from_class_folders(root)
    if source == "presplit":
        return sources.from_presplit(root)
    return sources.from_csv(root, csv_file, file_column, label_column)


def check_all(items: list[sources.Item]) -> list[str | None]:
    paths = [str(i.src) for i in items]
    n_workers = workers()
    bar = dict(total=len(paths), desc="decode check", disable=not progress_enabled())
    if n_workers <= 1:
        return [check_image(p) for p in tqdm(paths, **bar)]
    with ProcessPoolExecutor(n_workers) as pool:
        return list(tqdm(pool.map(check_image, paths, chunksize=16), **bar))


def main() -> None:
    params = load_params("data")
    p = params.data
    seed = params.seed
    val_fraction, test_fraction, on_bad_file = p.val_fraction, p.test_fraction, p.on_bad_file

    with atomic_dir(PREPARED) as out:
        images = out / "images"
        items = collect(p, images)
        reasons = check_all(items)
        skipped = [(i, r) for i, r in zip(items, reasons) if r is not None]
        if skipped and on_bad_file == "fail":
            item, reason = skipped[0]
            raise TlpipeError(f"{item.src}: {reason} ({len(skipped)} bad file(s) in all; "
                              f"set data.on_bad_file: skip to skip and report them)")
        for item, reason in skipped:
            print(f"skipped {item.src}: {reason}")
        usable = [i for i, r in zip(items, reasons) if r is None]
        if not usable:
            raise TlpipeError("no usable images in the source")
        split = sources.stratified_split(usable, val_fraction, test_fraction, seed)
        classes = sorted({i.label for i in split})
        if len(classes) < 2:
            raise TlpipeError(f"only one class ({classes[0]!r}) found; classification needs two or more")

        rows = []
        for item in tqdm(split, desc="copy", disable=not progress_enabled()):
            dest = images / item.rel
            if item.src != dest:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item.src, dest)
            rows.append((item.rel, item.label, item.split, sha256_file(dest)))
        for item, _ in skipped:
            if item.src.is_relative_to(images):
                item.src.unlink()
        manifest = pd.DataFrame(rows, columns=["path", "label", "split", "sha256"])
        manifest.to_csv(out / "manifest.csv", index=False)
        write_json(out / "classes.json", classes)
        pd.DataFrame([(str(i.src), r) for i, r in skipped], columns=["file", "reason"]).to_csv(
            out / "skipped.csv", index=False)

    counts = manifest.groupby("split").size()
    write_json(METRICS, {
        "files": len(items),
        "skipped": len(skipped),
        "classes": len(classes),
        **{f"{s}_images": int(counts.get(s, 0)) for s in sources.SPLITS},
    })
    print(f"{len(manifest)} images in {len(classes)} classes "
          f"({', '.join(f'{s} {int(counts.get(s, 0))}' for s in sources.SPLITS)}); "
          f"{len(skipped)} skipped")


if __name__ == "__main__":
    run_stage(main)
