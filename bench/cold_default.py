"""Cold `dvc repro` of the offline default: a new project with no overrides (the built-in digits).

    python bench/cold_default.py [--keep DIR] [--import-runs N]

Target (issue 19; DESIGN.md §8 said 3 minutes): <= 60 s on a quiet 2-core CPU. The project is what `python -m
tlpipe.tools.scaffold DIR` makes; the time is the wall time of `dvc repro` (DVC's own overhead and every
stage's Python start-up included), not the project's creation.

Where the time goes: `python` on the PATH of `dvc repro` is a shell shim that logs when each stage's
process starts and exits (the real interpreter runs it, unchanged), so each stage's time splits into
- its own `[stage] done in Xs` (its main(): the work),
- its start-up (process wall minus own: interpreter, imports, exit),
- DVC after it (from its exit to the next stage's start: hashing and caching its outputs, dvc.lock,
  checking the next stage).
After the repro, `import stages.X` is timed alone (median of --import-runs fresh interpreters, minus a
bare `python -c pass`), which says how much of the start-up the imports are.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import Section, Target, say, table
from rerun import stage_list

LIMIT_SECONDS = 60  # issue 19 (DESIGN.md §8 said 180)
# The shim: one line when the process starts and one when it exits (seconds since the epoch).
SHIM = """#!/bin/sh
echo "start $$ $(date +%s.%N) $*" >> {log}
{python} "$@"
rc=$?
echo "end $$ $(date +%s.%N) $rc" >> {log}
exit $rc
"""


def timed_repro(repo: Path) -> tuple[float, float, list[str], dict[str, str], dict[str, tuple[float, float]]]:
    """`dvc repro` with each stage process timed; (start, wall seconds, stages executed, their `done in`
    seconds, {stage: (process start, process end)} in epoch seconds)."""
    with tempfile.TemporaryDirectory(prefix="tlpipe-shim-") as shim_dir:
        log = Path(shim_dir) / "processes.log"
        shim = Path(shim_dir) / "python"
        shim.write_text(SHIM.format(log=shlex.quote(str(log)), python=shlex.quote(sys.executable)))
        shim.chmod(0o755)
        env = common.tool_env()
        env["PATH"] = f"{shim_dir}:{env['PATH']}"
        say(f"{repo.name}: dvc repro (stage processes timed) ...")
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, text=True,
                             capture_output=True, check=False)
        wall = time.time() - start
        if out.returncode:
            sys.exit(f"dvc repro failed:\n{out.stdout}\n{out.stderr}")
        say(f"{repo.name}: dvc repro done in {wall:.1f}s")
        starts, ends = {}, {}
        for line in log.read_text().splitlines():
            kind, pid, stamp, rest = (line.split(" ", 3) + [""])[:4]
            if kind == "start":
                found = re.search(r"-m stages\.(\w+)", rest)
                if found:
                    starts[pid] = (found.group(1), float(stamp))
            elif kind == "end" and pid in starts:
                ends[starts[pid][0]] = (starts[pid][1], float(stamp))
    return start, wall, re.findall(r"Running stage '(\w+)'", out.stdout), \
        dict(re.findall(r"\[(\w+)\] done in ([\d.]+)s", out.stderr)), ends


def import_seconds(repo: Path, stages: list[str], runs: int) -> tuple[float, dict[str, float]]:
    """(median wall of `python -c pass`, {stage: median wall of `import stages.<stage>` minus that})."""
    def median_wall(code: str) -> float:
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=repo, env=common.tool_env(), check=True,
                           capture_output=True)
            walls.append(time.perf_counter() - start)
        return statistics.median(walls)

    say(f"{repo.name}: timing each stage module's imports ({runs} runs each) ...")
    bare = median_wall("pass")
    return bare, {s: median_wall(f"import stages.{s}") - bare for s in stages}


def breakdown(start: float, wall: float, stages: list[str], times: dict[str, str],
              processes: dict[str, tuple[float, float]], bare: float, imports: dict[str, float]) -> str:
    rows = [["DVC before the first stage", "", "", "", "", processes[stages[0]][0] - start]]
    sums = [0.0, 0.0, 0.0, 0.0, rows[0][-1]]
    for i, stage in enumerate(stages):
        begun, ended = processes[stage]
        following = processes[stages[i + 1]][0] if i + 1 < len(stages) else start + wall
        own = float(times.get(stage, "nan"))
        row = [ended - begun, own, ended - begun - own, imports.get(stage, float("nan")), following - ended]
        sums = [a + b for a, b in zip(sums, row)]
        rows.append([stage, *row])
    rows.append(["**total**", *sums])
    rows = [[r[0], *(round(v, 2) if isinstance(v, float) else v for v in r[1:])] for r in rows]
    body = table(["stage", "process wall s", "own (`done in`) s", "start-up s (wall - own)",
                  "`import stages.X` s", "DVC after it s"], rows)
    process_wall = sums[0]
    return (f"{body}\n\n`dvc repro` took {wall:.1f}s: the stages' own work {sums[1]:.1f}s, their processes' "
            f"start-up (interpreter, imports, exit) {sums[2]:.1f}s, DVC {wall - process_wall:.1f}s (its "
            f"wall minus the stage processes'). `import stages.X`: median wall of a fresh `python -c "
            f"\"import stages.X\"` minus a bare `python -c pass` ({bare:.2f}s), measured after the repro.")


def run(workdir: Path, import_runs: int = 3) -> Section:
    say(f"default: new project {workdir / 'default'}")
    shutil.rmtree(workdir / "default", ignore_errors=True)  # cold means cold, also in a kept workdir
    repo = common.create_project(workdir / "default")
    start, seconds, stages, times, processes = timed_repro(repo)
    own = sum(float(t) for t in times.values())
    section = Section("cold `dvc repro` of the offline default (digits, no overrides)")
    section.parts.append(table(["run", "wall s", "stages executed (their own seconds)"], [
        ["`python -m tlpipe.tools.scaffold DIR`, then `dvc repro`", seconds, stage_list(stages, times)]]))
    section.parts.append(f"The stages' own time adds up to {own:.1f}s; the rest ({seconds - own:.1f}s) is "
                         "DVC (hashing, locking, the run cache) and each stage's Python start-up.")
    if import_runs:
        bare, imports = import_seconds(repo, stages, import_runs)
        section.parts.append("Where the time goes:\n\n" + breakdown(start, seconds, stages, times, processes,
                                                                    bare, imports))
    section.targets.append(Target("cold `dvc repro` of the default", f"<= {LIMIT_SECONDS}s", f"{seconds:.0f}s",
                                  seconds <= LIMIT_SECONDS))
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the project here and keep it")
    parser.add_argument("--import-runs", type=int, default=3,
                        help="fresh interpreters per stage module for the import times (median; 0: skip)")
    args = parser.parse_args()
    with common.Workdir(args.keep) as workdir:
        section = run(workdir, args.import_runs)
    print()
    print(section.markdown())
    print(common.targets_table(section.targets))


if __name__ == "__main__":
    main()
