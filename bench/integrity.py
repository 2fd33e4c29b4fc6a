"""What checking source images against the manifest's sha256 costs the decode (issue 30).

    python bench/integrity.py [--passes 3] [FOLDER ...]

Every image file under each folder (default: ../shared's hymenoptera and sign-digits) is decoded at
the photo geometry (224 px, resize 256, bicubic, jpeg_draft) by tlpipe.ingest.pixels.load_eval_pixels, as
a decode-stage loader worker does: once from the path (no check), once through read_verified with
the file's sha256 (the bytes read once, hashed, then decoded from memory: what the decode stage and
the galleries do). The two alternate, --passes times each, in one process on one core (the decode
stage spreads the same work over its workers); the table gives each variant's median pass and the
difference per image. The load average is printed: on a shared machine, small differences are noise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, table  # noqa: E402
from tlpipe.ingest.pixels import check_image, list_files, load_eval_pixels  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
GEOMETRY = {"img_size": 224, "resize_size": 256, "interpolation": "bicubic", "jpeg_draft": True}


def timed_pass(files: list[Path], hashes: list[str | None]) -> float:
    start = time.perf_counter()
    for path, digest in zip(files, hashes):
        load_eval_pixels(path, GEOMETRY, digest)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        default=[SHARED / "hymenoptera", SHARED / "sign-digits" / "images"])
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        files = [p for p in list_files(folder) if check_image(p) is None]
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
        start = time.perf_counter()
        for p in files:
            hashlib.sha256(p.read_bytes()).hexdigest()
        hashing = time.perf_counter() - start  # read + hash alone, files in the page cache
        plain, checked = [], []
        timed_pass(files, digests)  # warm-up: the page cache, PIL's plugins
        for _ in range(args.passes):
            plain.append(timed_pass(files, [None] * len(files)))
            checked.append(timed_pass(files, digests))
        a, b = statistics.median(plain), statistics.median(checked)
        mib = sum(p.stat().st_size for p in files) / 2**20
        rows.append([f"{folder.name} ({len(files)} files, {mib:.0f} MiB)", round(a, 2), round(b, 2),
                     f"{(b - a) / len(files) * 1e3:+.2f}", f"{(b - a) / a * 100:+.1f} %",
                     f"{hashing / len(files) * 1e3:.2f}"])
    print(f"load average (1 min): {os.getloadavg()[0]:.1f}; {args.passes} passes each, alternating; medians\n")
    print(table(["images", "decode (s)", "decode + sha256 check (s)", "ms/image", "relative",
                 "read + sha256 alone (ms/image)"], rows))


if __name__ == "__main__":
    main()
