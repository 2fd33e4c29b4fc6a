"""Cost as the work grows: per-stage seconds and bytes per image, and the project's disk against its images.

    python bench/scale.py                         # synthetic photo sets of 1,000 and 5,000 images
    python bench/scale.py --with-20000            # ... and 20,000 (about an hour on 2 cores)
    python bench/scale.py --source DIR [--source DIR ...]   # real class folders instead
    python bench/scale.py --code /path/to/other/checkout    # another tlpipe's pipeline (a before/after)

Each set gets a new project from the scaffold (`tlpipe.tools.scaffold --photos`: 224 px, the offline
EfficientNet-Lite0), with `data.source: folder` (or `presplit` for train/ + val/) on the set, outside
the project. Every stage runs once
by `dvc repro -s STAGE` in pipeline order and is timed by wall clock (DVC's own start-up, about a second,
included). Then every output and the whole project are measured on disk, counting a file that is
hard-linked into DVC's cache once (what `du` counts): the workspace with `.dvc/cache` and `.git`,
against the bytes of the source images, which are not in the project.

Fine-tuning runs `--finetune-epochs` epochs (default 1; its cost is per epoch and per image, so the
scaled sets show its slope without the recipe's 12 epochs); the real sets keep the recipe with
`--finetune-epochs -1`. Synthetic images: bench/synthetic.py (photo-like JPEGs, 240 to 1800 px).
`--json FILE` keeps every number; `--keep` keeps the projects (for bench/decoded_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import synthetic  # noqa: E402 (bench/ on the path)

SIZES = (1000, 5000)
# The outputs whose bytes are reported one by one (the rest are small and counted in the totals).
OUTPUTS = ("data/prepared", "data/decoded", "data/stats.json", "data/features", "models", "data/predictions",
           "metrics")


def env(code: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(code), "TLPIPE_PROGRESS": "0", "DVC_NO_ANALYTICS": "1"}


def run(cmd: list[str], cwd: Path, code: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(code), text=True, capture_output=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def disk(path: Path, seen: set | None = None) -> int:
    """Bytes of the files under `path` (or the file), each inode once (hard links into the cache)."""
    seen = set() if seen is None else seen
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    total = 0
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def images_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".gif", ".bmp",
                                                                                  ".webp", ".tif", ".tiff")]
    return len(files), sum(p.stat().st_size for p in files)


def measure(label: str, root: Path, workdir: Path, code: Path, epochs: int, extra: list[str]) -> dict:
    project = workdir / label
    shutil.rmtree(project, ignore_errors=True)
    layout = "presplit" if (root / "train").is_dir() and (root / "val").is_dir() else "folder"  # hymenoptera: presplit
    sets = ["--set", f"data.source={layout}", "--set", f"data.root={root}", *extra]
    if epochs >= 0:
        sets += ["--set", f"finetune.epochs={epochs}"]
    run([sys.executable, "-m", "tlpipe.tools.scaffold", str(project), "--photos", *sets], workdir, code)
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    n_files, n_bytes = images_bytes(root)
    print(f"[scale] {label}: {n_files} images, {n_bytes / 1e6:.1f} MB, project {project}", flush=True)
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        run([sys.executable, "-m", "dvc", "repro", "-s", stage], project, code)
        seconds[stage] = time.perf_counter() - start
        print(f"[scale] {label}: {stage} {seconds[stage]:.1f} s", flush=True)
    seen: set = set()
    outputs = {out: disk(project / out, seen) for out in OUTPUTS if (project / out).exists()}
    cache_only = disk(project / ".dvc" / "cache", seen)  # what the cache holds beyond the workspace's links
    with open(project / "data/prepared/manifest.csv") as f:
        images = sum(1 for _ in f) - 1  # the usable images (the manifest's rows)
    test = json.loads((project / "metrics/test.json").read_text())
    return {"label": label, "root": str(root), "project": str(project), "source_files": n_files,
            "source_bytes": n_bytes, "images": images, "seconds": seconds, "outputs": outputs,
            "cache_beyond_workspace": cache_only, "cache": disk(project / ".dvc" / "cache"),
            "project_bytes": disk(project), "cache_type": cache_type(project, code),
            "head_accuracy": test["head"]["accuracy"], "finetuned_accuracy": test["finetuned"]["accuracy"]}


def cache_type(project: Path, code: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", "config", "cache.type"], cwd=project, env=env(code),
                          text=True, capture_output=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "DVC's default (reflink,copy)"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def tables(results: list[dict]) -> str:
    stages = list(results[0]["seconds"])
    head = "| stage | " + " | ".join(f"{r['label']}: s | ms/image" for r in results) + " |"
    lines = [head, "|---|" + "---|---|" * len(results)]
    for stage in stages:
        cells = [f"{r['seconds'].get(stage, float('nan')):.1f} | {1e3 * r['seconds'].get(stage, 0) / r['images']:.1f}"
                 for r in results]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    total = [f"{sum(r['seconds'].values()):.0f} | {1e3 * sum(r['seconds'].values()) / r['images']:.0f}" for r in results]
    lines.append("| **all** | " + " | ".join(total) + " |")
    lines += ["", "| on disk | " + " | ".join(f"{r['label']}: MB | bytes/image" for r in results) + " |",
              "|---|" + "---|---|" * len(results)]
    rows = [("source images (outside the project)", "source_bytes")]
    for out in OUTPUTS:
        lines_out = [f"{mb(r['outputs'].get(out, 0))} | {r['outputs'].get(out, 0) / r['images']:,.0f}" for r in results]
        lines.append(f"| `{out}` | " + " | ".join(lines_out) + " |")
    for name, key in (("`.dvc/cache` beyond the workspace's links", "cache_beyond_workspace"),
                      ("**whole project** (workspace + `.dvc/cache` + `.git`)", "project_bytes"), *rows):
        lines.append(f"| {name} | " + " | ".join(f"{mb(r[key])} | {r[key] / r['images']:,.0f}" for r in results) + " |")
    lines.append("| **project / images** | " + " | ".join(f"{r['project_bytes'] / r['source_bytes']:.2f}x | "
                                                          for r in results) + " |")
    lines.append("")
    lines.append("cache.type: " + ", ".join(f"{r['label']}: {r['cache_type']}" for r in results) +
                 "; test accuracy (head / fine-tuned): " +
                 ", ".join(f"{r['label']}: {r['head_accuracy']:.3f} / {r['finetuned_accuracy']:.3f}" for r in results))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), help="synthetic set sizes")
    parser.add_argument("--with-20000", action="store_true", help="also the 20,000-image set")
    parser.add_argument("--source", type=Path, action="append", default=[], help="a real class folder (repeatable); "
                        "with --source and no --sizes given, only the real sets run")
    parser.add_argument("--code", type=Path, default=REPO, help="the tlpipe checkout whose pipeline to measure")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="-1: the recipe's own")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another param")
    parser.add_argument("--workdir", type=Path, help="where the projects go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the projects")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    sizes = [] if args.source and "--sizes" not in sys.argv else list(args.sizes)
    if args.with_20000:
        sizes.append(20000)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tlpipe-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = [a for kv in args.set for a in ("--set", kv)]
    sets = [(f"synthetic-{n}", synthetic.generate(n)) for n in sizes]
    sets += [(src.name if src.name != "images" else src.parent.name, src.resolve()) for src in args.source]
    results = []
    try:
        for label, root in sets:
            results.append(measure(label, root, workdir, args.code.resolve(), args.finetune_epochs, extra))
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ncode: {args.code.resolve()}; fine-tuning epochs: "
          f"{args.finetune_epochs if args.finetune_epochs >= 0 else 'the recipe'}; extra params: {args.set}\n")
    print(tables(results))


if __name__ == "__main__":
    main()
