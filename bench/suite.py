"""suite: where the test suite's CPU goes, process by process (issue 26's measuring tool).

    python bench/suite.py                      # `make test`'s pytest command, profiled
    python bench/suite.py -- -m "not slow" -n 2 tests/test_pipeline_dvc.py   # any pytest arguments

Every Python process the run starts (pytest workers, each `dvc` command, each stage that `dvc repro`
starts, `tlpipe` commands) loads a `sitecustomize` from a temporary folder put first on PYTHONPATH;
at exit it appends its CPU time (user + system, from getrusage), wall time, argv, the test it ran
under (PYTEST_CURRENT_TEST, which child processes inherit) and which heavy libraries it imported.
The tables: CPU by kind of process, by stage with the libraries it loaded, and by test.
Processes that end by os._exit or a signal are not counted (the total says how many were).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, say, table

HEAVY = ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib", "pandas", "onnx", "onnxruntime",
         "dvc", "dvclive")
HOOK = '''import atexit, json, os, resource, sys, time
_began = time.time()
def _record():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line = json.dumps({"argv": sys.argv[:3], "cpu": usage.ru_utime + usage.ru_stime, "wall": time.time() - _began,
                       "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                       "modules": [m for m in %r if m in sys.modules]})
    with open(%r, "a") as log:
        log.write(line + "\\n")
atexit.register(_record)
'''


def kind(argv: list[str]) -> str:
    """What a process was, from its argv (`python -m X` puts X's file path in argv[0])."""
    first = argv[0] if argv else ""
    if first.endswith("dvc/__main__.py") or first.endswith("/dvc"):
        return f"dvc {argv[1] if len(argv) > 1 else ''}".strip()
    if "/stages/" in first:
        return f"stage {Path(first).stem}"
    if "/tlpipe/" in first:
        return f"tlpipe {Path(first).stem} {argv[1] if len(argv) > 1 else ''}".strip()
    if first == "-c" or first.endswith("pytest/__main__.py"):
        return "pytest worker"
    return Path(first).name or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="after --; default: make test's arguments")
    args = parser.parse_args()
    pytest_args = args.pytest_args or ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "-m",
                                       "slow or not slow", "-q"]
    with tempfile.TemporaryDirectory() as hook_dir:
        log = Path(hook_dir) / "processes.jsonl"
        (Path(hook_dir) / "sitecustomize.py").write_text(HOOK % (HEAVY, str(log)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([hook_dir, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        say(f"pytest {' '.join(pytest_args)}")
        began, cpu_before = time.perf_counter(), os.times()
        code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO, env=env)
        wall, cpu_after = time.perf_counter() - began, os.times()
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    children = (cpu_after.children_user - cpu_before.children_user) + (cpu_after.children_system - cpu_before.children_system)
    counted = sum(r["cpu"] for r in records)
    print(f"\npytest exit {code}; wall {wall:.0f} s; CPU of every process {children:.0f} s, "
          f"{counted:.0f} s of it in {len(records)} Python processes counted here\n")

    by_kind = collections.defaultdict(list)
    for r in records:
        by_kind[kind(r["argv"])].append(r)
    rows = []
    for name, rs in sorted(by_kind.items(), key=lambda kv: -sum(r["cpu"] for r in kv[1]))[:30]:
        modules = collections.Counter(m for r in rs for m in r["modules"])
        rows.append([name, len(rs), f"{sum(r['cpu'] for r in rs):.0f}", f"{sum(r['cpu'] for r in rs) / len(rs):.2f}",
                     ", ".join(m for m in HEAVY if modules[m] == len(rs)) or "-"])
    print(table(["process", "count", "CPU s", "CPU s each", "imported by all of them"], rows))

    by_test = collections.Counter()
    for r in records:
        if kind(r["argv"]) != "pytest worker":
            by_test[r["test"] or "(no test: fixtures of a session, queue workers)"] += r["cpu"]
    print()
    print(table(["test", "CPU s of its child processes"], [[t, f"{c:.0f}"] for t, c in by_test.most_common(25)]))


if __name__ == "__main__":
    main()
