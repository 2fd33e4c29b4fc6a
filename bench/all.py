"""Every benchmark of DESIGN.md §8 in one run on this machine; writes BENCHMARKS.md.

    python bench/all.py              # the full run (about half an hour on 2 cores); `make bench`
    python bench/all.py --quick      # 300 synthetic images, 1 fine-tuning epoch: minutes, for development
    python bench/all.py --only stats,features --n 1000

The same images for both sides of every comparison: hymenoptera (read in place) and a synthetic
set of --n mixed-size JPEGs generated once into ~/.cache/tlpipe-bench (bench/synthetic.py). The
report is rewritten after each part, so an interrupted run still leaves what it measured.
A --quick report goes to bench/results/ (git-ignored), not over BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cold_default
import common
import features
import finetune
import head
import memory
import rerun
import stats
import synthetic
from common import REPO, Section, say, table, targets_table

PARTS = ("stats", "features", "head", "memory", "finetune", "rerun", "default")


def report(path: Path, info: dict, sections: list[Section], args, started: float, done: bool) -> None:
    targets = [t for s in sections for t in s.targets]
    lines = ["# Benchmarks", "",
             "Regenerate with `make bench` (`python bench/all.py`; `--help` for the options). "
             "Every comparison ran in this one run, on this machine, on the same images for both sides.",
             ""]
    if args.quick:
        lines += ["**Quick mode** (`--quick`: 300 synthetic images, 1 fine-tuning epoch): a development "
                  "check of the scripts, not the measurement.", ""]
    if not done:
        lines += [f"**Incomplete**: still running or interrupted (parts so far: {len(sections)}).", ""]
    lines += ["## Machine", "", table(["", ""], [[k, v] for k, v in info.items()]), "",
              f"Total benchmark time: {(time.perf_counter() - started) / 60:.1f} min.", "",
              "## Image sets", "", *[f"- {d}" for d in args.described], "",
              "## Summary: the targets of DESIGN.md §8", "", targets_table(targets), "",
              "PASS/FAIL judge a target; n/a rows are shown for context (end-to-end costs, or settings "
              "that are not the target's). Details, and what each number includes, below.", ""]
    lines += [s.markdown() for s in sections]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_dataset_args(parser)
    parser.add_argument("--only", help=f"comma-separated parts to run, of: {', '.join(PARTS)}")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out")
    parser.add_argument("--subset", type=int, help="images for the num_workers=2 reference and the "
                        "jpeg_draft=False feature check (default 1000; --quick 100)")
    parser.add_argument("--out", type=Path, help="the report (default BENCHMARKS.md at the repository root; "
                        "--quick: bench/results/BENCHMARKS-quick.md)")
    args = parser.parse_args()
    parts = args.only.split(",") if args.only else list(PARTS)
    parts = [p for p in parts if p not in args.skip.split(",")]
    for p in parts:
        if p not in PARTS:
            sys.exit(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    args.subset = args.subset or (100 if args.quick else 1000)
    out = args.out or (REPO / "bench" / "results" / "BENCHMARKS-quick.md" if args.quick else REPO / "BENCHMARKS.md")
    sets = args.sets.split(",")
    if "memory" in parts and "synthetic" not in sets:
        sets.append("synthetic")  # memory is measured on the synthetic set
    args.sets = ",".join(sets)

    started = time.perf_counter()
    info = common.machine()
    sections: list[Section] = []
    say(f"parts: {', '.join(parts)}; image sets: {args.sets}; report: {out}")
    with common.Workdir(args.workdir) as workdir:
        per_set = [p for p in parts if p in ("stats", "features", "head", "memory")]
        projects = common.make_projects(args, workdir) if per_set else []
        args.described = []
        for p in projects:
            if p.label == "hymenoptera":
                args.described.append(f"hymenoptera: {args.hymenoptera} (read in place; presplit: its val/ "
                                      "is the test split, val is carved out of train/)")
            else:
                args.described.append(f"{p.label}: {synthetic.describe(synthetic.default_dir(common.synthetic_n(args)))} "
                                      "(bench/synthetic.py; class folders, split 70/15/15 per class)")
        if "finetune" in parts:
            args.described.append(f"finetune: {args.hymenoptera / 'train'} as class folders (split 70/15/15 "
                                  "per class), and a copy of a fifth of it for the memory row")
        args.described.append("geometry on both: resize the short side to 256 (bicubic), centre-crop 224; "
                              f"backbone {common.BACKBONE}")

        def add(section: Section) -> None:
            sections.append(section)
            report(out, info, sections, args, started, done=False)
            say(f"finished: {section.title}")

        for p in projects:
            for name, module in (("stats", stats), ("features", features), ("head", head)):
                if name in parts:
                    add(module.run(p, workdir, args))
        if "memory" in parts:
            large = next(p for p in projects if p.label.startswith("synthetic"))
            n = common.synthetic_n(args)
            small = memory.small_project(workdir, max(100, n // 5), synthetic.default_dir(n))
            add(memory.run(large, small))
        if "finetune" in parts:
            # Its own image set (hymenoptera's train/ as a class folder) and projects.
            add(finetune.run(workdir, finetune.parse(["--data", str(args.hymenoptera / "train")]
                                                     + (["--quick"] if args.quick else []))))
        if "rerun" in parts:
            add(rerun.run(workdir, args.hymenoptera, {"finetune.epochs": 1} if args.quick else {}))
        if "default" in parts:
            add(cold_default.run(workdir))
    report(out, info, sections, args, started, done=True)
    print()
    print(out.read_text())
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
