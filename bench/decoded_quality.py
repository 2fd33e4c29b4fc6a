"""What JPEG-compressed decoded shards change: two projects of the same images, paired.

    python bench/decoded_quality.py EXACT_PROJECT JPEG_PROJECT

Both projects ran the whole pipeline on the same source and split (bench/scale.py --keep makes them:
one with the exact uint8 shards, `image.decoded_quality: 0` or a tlpipe before JPEG shards, one with
the JPEG shards). Prints, per split, the cosine of each image's last-layer features to its exact
twin; the head's and the fine-tuned model's test accuracy in each with the exact McNemar test between
them (tlpipe.metrics.mcnemar: only the images one gets right and the other wrong count); the
features stage's ms per image and the fine-tuning stage's images per second (train images x epochs
run / the stage's wall time, from bench/scale.py's --json when given); and the decoded shards' bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tlpipe.metrics import mcnemar  # noqa: E402


def features(project: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_file(str(project / "data" / "features" / f"{split}.safetensors"))
    return data["features"].double(), data["ids"]


def predictions(project: Path, model: str) -> pd.DataFrame:
    return pd.read_csv(project / "metrics" / "predictions" / f"{model}.csv", dtype=str, keep_default_na=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exact", type=Path)
    parser.add_argument("jpeg", type=Path)
    args = parser.parse_args()
    a, b = args.exact, args.jpeg
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
