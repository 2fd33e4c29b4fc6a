"""recipe: `finetune.recipe: auto` on real sets, seed by seed: what the search chose, the val losses
behind it, the test accuracy of the fine-tuned model against the probe (exact McNemar), and the
search's cost in minutes and as a fraction of the full run it chose.

    python bench/recipe.py [--sets sign-digits,sign-digits-tiny,hymenoptera] [--seeds 0,1,2] [--workdir DIR]

Each (set, seed) is a project made by tlpipe.tools.scaffold and run with `dvc repro` (cold):
- sign-digits: folder source (../shared/datasets/sign-digits/images, 70/15/15), 128 px, `--recipe auto`
  (the fixed `far` recipe's comparison point: docs/finetuning.md);
- sign-digits-tiny: the same with data.test_fraction 0.7 (31 training images per class);
- hymenoptera: presplit source, `--photos` (recipe auto is its default);
- sign-digits-tiny-far: the tiny cut with the fixed `far` recipe (no search), the comparison point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common
from common import HYMENOPTERA, say, table

from tlpipe.tools.scaffold import RECIPES, create_project, photo_settings  # noqa: E402 (common puts the repo on the path)

SIGN_DIGITS = HYMENOPTERA.parent / "sign-digits" / "images"
SETS = {
    "sign-digits": lambda: {**RECIPES["auto"], "data.source": "folder", "data.root": str(SIGN_DIGITS),
                            "image.img_size": 128, "image.resize_size": 128},
    "sign-digits-tiny": lambda: {**SETS["sign-digits"](), "data.test_fraction": 0.7},
    "hymenoptera": lambda: {**photo_settings(), "data.source": "presplit", "data.root": str(HYMENOPTERA)},
    # the comparison points: the fixed `far` recipe on the same projects (no search)
    "sign-digits-tiny-far": lambda: {**{k: v for k, v in SETS["sign-digits-tiny"]().items()
                                        if not k.startswith("finetune.")}, **RECIPES["far"]},
}


def run_one(name: str, seed: int, workdir: Path) -> dict:
    project = workdir / f"recipe-{name}-{seed}"
    say(f"{name} seed {seed}: dvc repro in {project}")
    create_project(project, {**SETS[name](), "seed": seed})
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=common.tool_env(),
                          text=True, capture_output=True)
    if proc.returncode:
        sys.exit(f"dvc repro failed in {project}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    finetune = json.loads((project / "metrics" / "finetune.json").read_text())
    test = json.loads((project / "metrics" / "test.json").read_text())
    return {"set": name, "seed": seed, "wall": time.perf_counter() - began, "finetune": finetune, "test": test}


def row(r: dict) -> list:
    s, test, ft = r["finetune"].get("search"), r["test"], r["finetune"]
    paired = test["paired"]
    common_cells = [f"{ft['val_loss']:.3f} (epoch {ft['best_epoch']})", f"{test['head']['accuracy']:.3f}",
                    f"{test['finetuned']['accuracy']:.3f}",
                    f"{paired['head_only_right']} / {paired['finetuned_only_right']}, p {paired['p_value']:.2g}"]
    if s is None:  # a fixed recipe
        return [r["set"], r["seed"], "-", "(fixed)", f"{ft['initial_val_loss']:.3f}", "-", *common_cells,
                "-", "-", "-", "-"]
    losses = "; ".join(f"{c['candidate']} {c['val_loss']:.4f} @{c['epochs']}" for c in s["rounds"]) or "-"
    ties = "; ".join(f"round {t['round']}: {', '.join(t['tied'])} (se {t['paired_se']:.4f})" for t in s.get("ties", []))
    return [r["set"], r["seed"], f"{s['signals'].get('probe_cv_accuracy', float('nan')):.3f}", s["chosen"],
            f"{s.get('probe_val_loss', ft['initial_val_loss']):.3f}", losses, *common_cells, ties or "-",
            f"{s['seconds'] / 60:.2f}", f"{s['final_run_seconds'] / 60:.2f}",
            f"{s['seconds'] / max(s['final_run_seconds'], 1e-9):.2f} (planned {s.get('planned_fraction', '-')})"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="sign-digits,sign-digits-tiny,hymenoptera")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    results = []
    with common.Workdir(args.workdir) as workdir:
        for name in args.sets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                results.append(run_one(name, seed, workdir))
                print(json.dumps({k: v for k, v in results[-1].items()}), flush=True)
    print(table(["set", "seed", "probe CV acc", "chose", "probe val loss", "search: best val loss @ epochs",
                 "kept val loss", "probe test acc", "fine-tuned test acc", "probe only / fine-tuned only",
                 "ties", "search min", "full run min", "search / full run"], [row(r) for r in results]))


if __name__ == "__main__":
    main()
