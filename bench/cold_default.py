"""Cold `dvc repro` of the offline default: a new project with no overrides (the built-in digits).

    python bench/cold_default.py [--keep DIR]

Target (DESIGN.md §8): <= 3 minutes on a 2-core CPU. The project is what `python -m
tlpipe.scaffold DIR` makes; the time is the wall time of `dvc repro` (DVC's own overhead and every
stage's Python start-up included), not the project's creation.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import common
from common import Section, Target, say, table
from rerun import dvc, stage_list

LIMIT_SECONDS = 180


def run(workdir: Path) -> Section:
    say(f"default: new project {workdir / 'default'}")
    shutil.rmtree(workdir / "default", ignore_errors=True)  # cold means cold, also in a kept workdir
    repo = common.create_project(workdir / "default")
    seconds, stages, times = dvc(repo, "repro")
    own = sum(float(t) for t in times.values())
    section = Section("cold `dvc repro` of the offline default (digits, no overrides)")
    section.parts.append(table(["run", "wall s", "stages executed (their own seconds)"], [
        ["`python -m tlpipe.scaffold DIR`, then `dvc repro`", seconds, stage_list(stages, times)]]))
    section.parts.append(f"The stages' own time adds up to {own:.1f}s; the rest ({seconds - own:.1f}s) is "
                         "DVC (hashing, locking, the run cache) and each stage's Python start-up.")
    section.targets.append(Target("cold `dvc repro` of the default", f"<= {LIMIT_SECONDS}s", f"{seconds:.0f}s",
                                  seconds <= LIMIT_SECONDS))
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the project here and keep it")
    args = parser.parse_args()
    with common.Workdir(args.keep) as workdir:
        section = run(workdir)
    print()
    print(section.markdown())
    print(common.targets_table(section.targets))


if __name__ == "__main__":
    main()
