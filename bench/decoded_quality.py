"""What JPEG-compressed decoded shards change: two projects of the same images, paired.

    python bench/decoded_quality.py EXACT_PROJECT JPEG_PROJECT
    python bench/decoded_quality.py --time 3 EXACT_PROJECT JPEG_PROJECT   # paired stage timings

Both projects ran the whole pipeline on the same source and split (bench/scale.py --keep makes them:
one with the exact uint8 shards, `image.decoded_quality: 0` or a tlpipe before JPEG shards, one with
the JPEG shards). Prints, per split, the cosine of each image's last-layer features to its exact
twin; the head's and the fine-tuned model's test accuracy in each with the exact McNemar test between
them (tlpipe.report.metrics.mcnemar: only the images one gets right and the other wrong count); the
features stage's ms per image and the fine-tuning stage's images per second (train images x epochs
run / the stage's wall time, from bench/scale.py's --json when given); and the decoded shards' bytes.

--time N: the speed comparison proper. Runs `python -m stages.features` and `python -m stages.finetune`
in the two projects alternately (exact, JPEG, exact, ...), N times each, and reports each stage's own
"done in" seconds (its main(), without interpreter start-up) as min / median. Run it on copies: the
stages rewrite their outputs (bit-identical for features; set finetune.epochs in the copies' params.yaml
to bound the time). Under `flock /work/bench.lock` so no other benchmark runs meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tlpipe.report.metrics import mcnemar  # noqa: E402


def features(project: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_file(str(project / "data" / "features" / f"{split}.safetensors"))
    return data["features"].double(), data["ids"]


def predictions(project: Path, model: str) -> pd.DataFrame:
    return pd.read_csv(project / "metrics" / "predictions" / f"{model}.csv", dtype=str, keep_default_na=False)


def stage_seconds(project: Path, stage: str) -> float:
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, text=True, capture_output=True,
                          env={**os.environ, "TLPIPE_PROGRESS": "0"})
    if proc.returncode:
        sys.exit(f"{stage} failed in {project}:\n{proc.stderr[-2000:]}")
    return float(re.findall(rf"\[{stage}\] done in ([\d.]+)s", proc.stderr)[-1])


def timings(exact: Path, jpeg: Path, n: int) -> dict:
    out = {}
    for stage in ("features", "finetune"):
        runs: dict[str, list[float]] = {"exact": [], "jpeg": []}
        for _ in range(n):
            for name, project in (("exact", exact), ("jpeg", jpeg)):
                runs[name].append(stage_seconds(project, stage))
                print(f"[time] {stage} {name}: {runs[name][-1]:.2f} s", flush=True)
        out[stage] = {k: {"runs": v, "min": min(v), "median": statistics.median(v)} for k, v in runs.items()}
        out[stage]["speed_ratio_median"] = out[stage]["exact"]["median"] / out[stage]["jpeg"]["median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exact", type=Path)
    parser.add_argument("jpeg", type=Path)
    parser.add_argument("--time", type=int, default=0, help="paired stage timings, this many runs each")
    args = parser.parse_args()
    a, b = args.exact, args.jpeg
    if args.time:
        result = timings(a, b, args.time)
        print(json.dumps(result, indent=1))
        for stage, r in result.items():
            print(f"{stage}: exact median {r['exact']['median']:.2f} s (min {r['exact']['min']:.2f}), JPEG median "
                  f"{r['jpeg']['median']:.2f} s (min {r['jpeg']['min']:.2f}): JPEG at {r['speed_ratio_median']:.3f}x "
                  f"the exact shards' images/s")
        return
    out = {"exact": str(a), "jpeg": str(b), "cosine": {}, "models": {}}
    for split in ("train", "val", "test"):
        fa, ia = features(a, split)
        fb, ib = features(b, split)
        assert torch.equal(ia, ib), f"{split}: the two projects' manifests differ"
        cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1).numpy()
        out["cosine"][split] = {"images": len(cos), "mean": float(cos.mean()), "min": float(cos.min()),
                                "p01": float(np.quantile(cos, 0.01))}
    for model in ("head", "finetuned"):
        pa, pb = predictions(a, model), predictions(b, model)
        assert pa["path"].tolist() == pb["path"].tolist()
        truth = pa["actual"].to_numpy()
        test = mcnemar(truth, pa["predicted"].to_numpy(), pb["predicted"].to_numpy())
        out["models"][model] = {"exact_accuracy": float((pa["predicted"] == pa["actual"]).mean()),
                                "jpeg_accuracy": float((pb["predicted"] == pb["actual"]).mean()),
                                "images": len(pa), **test}
    for name, project in (("exact", a), ("jpeg", b)):
        meta = json.loads((project / "data" / "decoded" / "meta.json").read_text())
        timing = json.loads((project / "metrics" / "features.json").read_text())
        out[name] = {"decoded_bytes": meta["bytes"], "codec": meta.get("codec", {"format": "raw"}),
                     "features_ms_per_image": timing["ms_per_image"]}
    print(json.dumps(out, indent=1))
    print("\n| split | images | cosine mean | 1st percentile | min |\n|---|---|---|---|---|")
    for split, c in out["cosine"].items():
        print(f"| {split} | {c['images']} | {c['mean']:.5f} | {c['p01']:.5f} | {c['min']:.5f} |")
    print("\n| model | exact | JPEG | exact only right | JPEG only right | McNemar p |\n|---|---|---|---|---|---|")
    for model, m in out["models"].items():
        print(f"| {model} | {m['exact_accuracy']:.4f} | {m['jpeg_accuracy']:.4f} | {m['a_only']} | {m['b_only']} | "
              f"{m['p_value']} |")
    print(f"\ndecoded shards: exact {out['exact']['decoded_bytes'] / 1e6:.1f} MB, JPEG {out['jpeg']['decoded_bytes'] / 1e6:.1f}"
          f" MB; features stage: exact {out['exact']['features_ms_per_image']} ms/image, JPEG "
          f"{out['jpeg']['features_ms_per_image']} ms/image (one run each)")


if __name__ == "__main__":
    main()
