"""head: linear probe on cached features; L2 strength chosen on val from a log grid.

Protocol (Kornblith et al. 2019, CLIP): multinomial logistic regression by L-BFGS on train features,
one fit per grid point from the strongest L2 to the weakest (each warm-started from the last), the
point with the best val accuracy kept (ties: lower val log loss). Test is not read here.
"""

import numpy as np
import pandas as pd
from safetensors.torch import save_file

from tlpipe import linear
from tlpipe.features import load_split, source_of
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.params import load_params
from tlpipe.paths import HEAD, HEAD_CONFIG, HEAD_GRID, HEAD_METRICS
from tlpipe.runtime import run_stage


def main() -> None:
    params = load_params("head")
    h = params.head
    grid = np.logspace(h.l2_min_log10, h.l2_max_log10, h.l2_steps)[::-1]
    max_iter = h.max_iter

    train, meta = load_split("train")
    val, _ = load_split("val")
    rows, best, (weight, bias) = linear.sweep(train["features"], train["labels"], val["features"],
                                              val["labels"], len(meta["classes"]), grid, max_iter)
    for row in rows:
        print("  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "log10_l2"))

    with atomic_path(HEAD) as tmp:
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp))
    write_json(HEAD_CONFIG, {"type": "linear", **source_of(meta), "l2": rows[best]["l2"],
                             "sha256": sha256_file(HEAD)})  # of head.safetensors, checked by its readers
    with atomic_path(HEAD_GRID) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    chosen = rows[best]
    write_json(HEAD_METRICS, {"l2": chosen["l2"], "train_accuracy": chosen["train_accuracy"],
                         "val_accuracy": chosen["val_accuracy"], "val_log_loss": chosen["val_log_loss"]})
    print(f"chose l2={chosen['l2']:.2e}: val accuracy {chosen['val_accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main)
