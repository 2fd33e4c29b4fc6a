"""memory: peak RSS of the stats and features stages on the synthetic set at two sizes.

    python bench/memory.py [--quick] [--n 5000] [--small N] [--workdir DIR]

Target (the issue's): peak memory must not grow with the number of images. Each stage runs as a
subprocess; its whole process tree (DataLoader workers included) is polled with psutil every 20
ms and the summed RSS's peak kept. The small set is the first --small images of the large one
(default n/5; a csv source over the same files), so only the count differs.

"Does not grow" is judged as: the large run's peak exceeds the small run's by at most
max(64 MiB, 10 %). Some growth is inherent and tiny: the features themselves (1280 float32 per
image, 5 KiB) are gathered before writing, and the manifest is in memory. Holding decoded images
would cost 147 KiB each at 224 px, so a leak of that kind shows up as hundreds of MiB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import synthetic
from common import PHOTO_GEOMETRY, Project, Section, Target, mib, say, table

STAGES = ("data", "decode", "stats", "features")
JUDGED = ("stats", "features")
SLACK_BYTES = 64 << 20
SLACK_FRACTION = 0.10


def small_project(workdir, n_small: int, root) -> Project:
    csv = synthetic.subset_csv(root, n_small)
    return Project.create(workdir / f"synthetic-first-{n_small}", f"synthetic-first-{n_small}", {
        "data.source": "csv", "data.root": str(root), "data.csv_file": csv, **PHOTO_GEOMETRY})


def run(large: Project, small: Project) -> Section:
    stages = [s for s in STAGES if large.has_stage(s)]
    for p in (small, large):
        p.prepare("features")
    rows, targets = [], []
    for stage in stages:
        a, b = small.runs[stage], large.runs[stage]
        growth = b.peak_rss - a.peak_rss
        allowed = max(SLACK_BYTES, SLACK_FRACTION * a.peak_rss)
        judged = stage in JUDGED
        rows.append([stage, mib(a.peak_rss), mib(b.peak_rss), f"{growth / 2**20:+.0f} MiB",
                     f"{a.seconds:.1f} / {b.seconds:.1f}", "judged" if judged else "for information"])
        if judged:
            targets.append(Target(f"{stage} peak RSS ({small.label} vs {large.label})",
                                  f"growth <= {mib(allowed)}", f"{mib(a.peak_rss)} -> {mib(b.peak_rss)}",
                                  growth <= allowed))
    section = Section(f"memory: peak RSS, {small.label} vs {large.label}")
    section.parts.append(table(["stage", f"peak RSS, {small.label}", f"peak RSS, {large.label}", "growth",
                                "stage s (small / large)", ""], rows))
    section.parts.append("Peak of the summed RSS of the stage's process tree (DataLoader workers included), "
                         "polled every 20 ms; pages shared between processes count once per process.")
    section.targets += targets
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="the large set (default 5000)")
    parser.add_argument("--small", type=int, help="the small set (default n/5)")
    parser.add_argument("--quick", action="store_true", help="n=300, for development")
    parser.add_argument("--workdir", type=Path, help="where projects are built (kept when given)")
    args = parser.parse_args()
    n = 300 if args.quick else args.n
    n_small = args.small or max(100, n // 5)
    if n_small >= n:
        sys.exit(f"--small ({n_small}) must be below --n ({n})")
    root = synthetic.generate(n)
    say(synthetic.describe(root))
    with common.Workdir(args.workdir) as workdir:
        large = Project.create(workdir / f"synthetic-{n}", f"synthetic-{n}", {
            "data.source": "folder", "data.root": str(root), **PHOTO_GEOMETRY})
        section = run(large, small_project(workdir, n_small, root))
    print()
    print(section.markdown())
    print(common.targets_table(section.targets))


if __name__ == "__main__":
    main()
