"""`tlpipe predict` on many small images: the PyTorch head against its ONNX export (issue 30).

    python bench/predict.py [--n 10000] [--repeats 3] [--workdir DIR] [--kinds head,onnx]
                            [--before /path/to/older/tlpipe]

A default project (8x8 digit scans at 64 px, tf_efficientnet_lite0) is run to export_head (data,
decode, features, head, export_head as subprocesses, as `dvc repro` runs them); then --n small PNG
files (the digit scans, each with a little seeded noise so that no two files are alike) are
predicted by `tlpipe predict --model head` and `--model models/head.onnx`, as a user runs it (a
subprocess: interpreter start-up, imports, the up-front decode check, decoding, the model, the CSV).
The two kinds alternate, --repeats times each, so a load change on a shared machine hits both; the
table gives every run's wall seconds and their median, and the head's median over the ONNX
file's (the target: at most 2x), and the median CPU seconds (user + system, the command's whole
process tree): on a machine so loaded that a niced run waits for a core most of the time, CPU
time still says how much work each path does (threads spinning at a barrier count as work). The load average is printed: numbers from a loaded machine are noisy.
With --before (a `tlpipe` package folder of another checkout, e.g. before a change), a copy of the
project running that code's `--model head` joins the alternation as "head (before)".
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Project, Workdir, machine, run_monitored, say, table  # noqa: E402

KINDS = {"head": "head", "onnx": "models/head.onnx"}
TARGET_RATIO = 2.0


def small_images(folder: Path, n: int) -> Path:
    """n PNG files of 8x8 digit scans with seeded noise, 1000 per sub-folder (made once per folder)."""
    from sklearn.datasets import load_digits

    if len(list(folder.rglob("*.png"))) == n:
        return folder
    scans = load_digits().images
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.clip(scans[i % len(scans)] * 255 / 16 + rng.normal(0, 8, (8, 8)), 0, 255).astype(np.uint8)
        path = folder / f"{i // 1000:02d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)
    return folder


def with_code(project: Project, package: Path) -> Project:
    """A copy of `project` whose stages and commands run the tlpipe package at `package`."""
    copy = project.path.with_name(project.path.name + "-before")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(project.path, copy, symlinks=True, ignore=shutil.ignore_patterns("tlpipe"))
    shutil.copytree(package, copy / "tlpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return Project(copy, f"{project.label} (before)")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def predict_once(project: Project, kind: str, images: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `tlpipe predict` run."""
    model = KINDS[kind.replace("-before", "")]
    cmd = [sys.executable, "-m", "tlpipe.tools.cli", "predict", "--model", model, str(images), "--out", str(out)]
    cpu = children_cpu()
    wall, _, stdout, stderr, code = run_monitored(cmd, project.path)
    cpu = children_cpu() - cpu
    if code or "0 errors" not in stdout:
        sys.exit(f"predict --model {model} failed (exit {code}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images to predict (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating (default: %(default)s)")
    parser.add_argument("--kinds", default="head,onnx", help="comma-separated: head, onnx (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the project and images here (default: a temporary folder)")
    parser.add_argument("--before", type=Path, help="a tlpipe package folder whose `--model head` runs too")
    args = parser.parse_args()
    kinds = (["head-before"] if args.before else []) + args.kinds.split(",")
    with Workdir(args.workdir) as workdir:
        project = Project(workdir / "project", "digits") if (workdir / "project" / "models/head.onnx").is_file() \
            else Project.create(workdir / "project", "digits", {})
        if not (project.path / "models/head.onnx").is_file():
            for stage in ("data", "decode", "features", "head", "export_head"):
                project.run(stage)
        images = small_images(workdir / "images", args.n)
        projects = {k: project for k in kinds}
        if args.before:
            projects["head-before"] = with_code(project, args.before)
        walls: dict[str, list[float]] = {k: [] for k in kinds}
        cpus: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.repeats):
            for kind in kinds:
                wall, cpu = predict_once(projects[kind], kind, images, workdir / f"{kind}.csv")
                walls[kind].append(wall)
                cpus[kind].append(cpu)
                say(f"run {r + 1}: {kind} {wall:.1f}s, CPU {cpu:.1f}s (load {os.getloadavg()[0]:.1f})")
    medians = {k: statistics.median(v) for k, v in walls.items()}
    names = {**{k: f"--model {m}" for k, m in KINDS.items()}, "head-before": "--model head (before)"}
    rows = [[names[k], " ".join(f"{w:.1f}" for w in walls[k]), round(medians[k], 1),
             round(args.n / medians[k], 1),
             round(medians[k] / medians["onnx"], 2) if "onnx" in medians else "n/a",
             round(statistics.median(cpus[k]), 1)] for k in kinds]
    print()
    load = [["load average (1 min)", f"{os.getloadavg()[0]:.1f}"]]
    print(table(["", ""], [[k, v] for k, v in machine().items()] + load))
    print()
    print(f"`tlpipe predict` on {args.n} small PNG files (8x8 digit scans, decoded to 64 px), wall seconds of "
          f"the whole command, {args.repeats} runs of each kind alternating:")
    print()
    print(table(["model", "runs, wall (s)", "median (s)", "images/s", "x ONNX", "median CPU (s)"], rows))
    if {"head", "onnx"} <= set(medians):
        ratio = medians["head"] / medians["onnx"]
        print(f"\nhead / ONNX: {ratio:.2f}x (target: at most {TARGET_RATIO:g}x): "
              f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'}")


if __name__ == "__main__":
    main()
