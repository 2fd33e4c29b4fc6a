"""head: linear probe on cached features; L2 strength chosen on val from a log grid.

Protocol (Kornblith et al. 2019, CLIP): multinomial logistic regression by L-BFGS on train features,
one fit per grid point from the strongest L2 to the weakest (each warm-started from the last), the
point with the best val accuracy kept (ties: lower val log loss). Test is not read here.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tlpipe import linear
from tlpipe.features import load_split
from tlpipe.io import atomic_path, write_json
from tlpipe.params import load_params
from tlpipe.runtime import run_stage

MODEL = Path("models/head.safetensors")
MODEL_CONFIG = Path("models/head.json")
METRICS = Path("metrics/head.json")
GRID_PLOT = Path("metrics/head_grid.csv")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def main() -> None:
    params = load_params("head")
    h = params.head
    grid = np.logspace(h.l2_min_log10, h.l2_max_log10, h.l2_steps)[::-1]
    max_iter = h.max_iter

    train, meta = load_split("train")
    val, _ = load_split("val")
    n_classes = len(meta["classes"])
    x_train = train["features"].double()
    scaler = linear.Standardizer.fit(x_train)
    x_train, x_val = scaler(x_train), scaler(val["features"].double())
    y_train, y_val = train["labels"], val["labels"]

    rows, fits, init = [], [], None
    for l2 in grid:
        w, b = linear.fit_logistic(x_train, y_train, n_classes, float(l2), max_iter, init)
        init = (w, b)
        fits.append((w, b))
        val_logits = x_val @ w.T + b
        rows.append({
            "log10_l2": round(float(np.log10(l2)), 4),
            "l2": float(l2),
            "train_accuracy": round(accuracy(x_train @ w.T + b, y_train), 6),
            "val_accuracy": round(accuracy(val_logits, y_val), 6),
            "val_log_loss": round(float(F.cross_entropy(val_logits, y_val)), 6),
        })
        print("  ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "log10_l2"))
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"]))
    weight, bias = linear.fold(*fits[best], scaler)

    with atomic_path(MODEL) as tmp:
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp))
    write_json(MODEL_CONFIG, {
        "type": "linear",
        "in_features": meta["feature_dim"],
        "classes": meta["classes"],
        "l2": rows[best]["l2"],
        "features": {k: meta[k] for k in ("backbone", "weights_sha256", "feature_dim", "transform",
                                          "normalize", "mean", "std")},
    })
    with atomic_path(GRID_PLOT) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    chosen = rows[best]
    write_json(METRICS, {"l2": chosen["l2"], "train_accuracy": chosen["train_accuracy"],
                         "val_accuracy": chosen["val_accuracy"], "val_log_loss": chosen["val_log_loss"]})
    print(f"chose l2={chosen['l2']:.2e}: val accuracy {chosen['val_accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main)
