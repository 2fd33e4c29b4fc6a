"""Cold `dvc repro` on hymenoptera, then the rerun after a head param change, side by side.

    python bench/rerun.py [--dataset ../shared/datasets/hymenoptera] [--keep DIR]

Target (DESIGN.md §8): the incremental rerun takes <= 5 % of the cold run, and runs neither
features nor fine-tuning.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tlpipe.scaffold import create_project  # noqa: E402


# ImageNet geometry and photo augmentation for real photos (the defaults suit 8x8 digit scans);
# the same settings as the README's hymenoptera example.
PHOTO_PARAMS = {"image.img_size": 224, "image.resize_size": 256, "finetune.hflip": True,
                "finetune.randaugment_magnitude": 9, "finetune.crop_scale_min": 0.25,
                "finetune.label_smoothing": 0.0, "finetune.lr": 3e-4, "finetune.probe_l2": 1.0,
                "finetune.epochs": 12, "finetune.patience": 5}


def dvc(repo: Path, *args: str) -> tuple[float, list[str]]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "TLPIPE_PROGRESS": "0"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, text=True,
                         capture_output=True)
    elapsed = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    stage_times = re.findall(r"\[(\w+)\] done in ([\d.]+)s", out.stderr)
    return elapsed, re.findall(r"Running stage '(\w+)'", out.stdout), dict(stage_times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parent.parent.parent
                                                 / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--keep", help="build the project here and keep it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra param override (value parsed as YAML)")
    args = parser.parse_args()
    if not Path(args.dataset).is_dir():
        sys.exit(f"dataset not found: {args.dataset}")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tlpipe-bench-"))
    repo = create_project(workdir / "project", {
        "data.source": "presplit", "data.root": str(Path(args.dataset).resolve()),
        **PHOTO_PARAMS, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}})
    cold, cold_stages, cold_times = dvc(repo, "repro")
    head_metrics = json.loads((repo / "metrics" / "test.json").read_text())
    warm, warm_stages, warm_times = dvc(repo, "exp", "run", "-S", "head.l2_steps=9")
    rows = [("cold dvc repro", cold, cold_stages, cold_times),
            ("rerun after head.l2_steps change", warm, warm_stages, warm_times)]
    print(f"{'run':36} {'wall s':>8}  stages executed (stage seconds)")
    for name, secs, stages, times in rows:
        detail = ", ".join(f"{s} ({times.get(s, '?')})" for s in stages)
        print(f"{name:36} {secs:8.1f}  {detail}")
    print(f"{'ratio rerun / cold':36} {warm / cold:8.3f}  (target <= 0.05)")
    finetune = json.loads((repo / "metrics" / "finetune.json").read_text())
    print(f"test accuracy (cold run): head {head_metrics['head']['accuracy']:.4f}, "
          f"fine-tuned {head_metrics['finetuned']['accuracy']:.4f} "
          f"(fine-tuning: {finetune['epochs_run']} epochs run, best epoch {finetune['best_epoch']})")
    print(f"features executed on rerun: {'features' in warm_stages}; "
          f"fine-tuning executed on rerun: {'finetune' in warm_stages}")


if __name__ == "__main__":
    main()
