"""What the head stage reports besides the head itself: suspect labels and the layer sets' curves.

`write_heldout` keeps the head's held-out (out-of-fold, or val) logits for evaluate, which compares
the head with the fine-tuned model on val by them; `write_suspects` turns their probabilities into
metrics/suspect_labels.csv and its gallery (tlpipe.ingest.audit's rule); `write_layer_curves` writes
every layer set's L2 curve to metrics/head_layers.csv and draws metrics/head_layers.png. Only the
head stage imports this module.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tlpipe.ingest import audit
from tlpipe.io import atomic_path, sha256_file
from tlpipe.manifest import hashes_by_path, read_manifest
from tlpipe.paths import HEAD_HELDOUT, HEAD_LAYERS, HEAD_LAYERS_PLOT, SUSPECTS, SUSPECTS_GALLERY
from tlpipe.report import gallery

MAX_SUSPECTS_SHOWN = 40


def write_heldout(logits, labels, ids) -> str:
    """The held-out logits (float32), their labels and manifest ids; returns the file's sha256."""
    from safetensors.torch import save_file

    with atomic_path(HEAD_HELDOUT) as tmp:
        save_file({"logits": logits.float().contiguous(), "labels": labels.long().contiguous(),
                   "ids": ids.long().contiguous()}, str(tmp))
    return sha256_file(HEAD_HELDOUT)


def write_suspects(proba: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> int:
    """The suspect labels among the held-out images (rows `ids` of the manifest, given `labels`,
    calibrated probabilities `proba`): the table and its gallery; returns how many."""
    manifest, classes = read_manifest()
    found = audit.suspect_labels(proba, labels)
    rows = manifest.loc[ids[found["index"]]]
    table = pd.DataFrame({"path": rows["path"].to_numpy(), "split": rows["split"].to_numpy(),
                          "given_label": rows["label"].to_numpy(),
                          "suspected_label": [classes[i] for i in found["suspected"]],
                          "given_probability": found["given_probability"].round(6),
                          "suspected_probability": found["suspected_probability"].round(6)})
    with atomic_path(SUSPECTS) as tmp:
        table.to_csv(tmp, index=False)
    shown = table.head(MAX_SUSPECTS_SHOWN)
    gallery.draw(list(shown["path"]), [f"given {r.given_label} ({r.given_probability:.2f})\nlooks {r.suspected_label} "
                                       f"({r.suspected_probability:.2f})" for r in shown.itertuples()],
                 SUSPECTS_GALLERY, f"suspect labels: {len(table)} of {len(labels)} train + val images "
                 f"(out-of-fold probe){'' if len(shown) == len(table) else f'; the {len(shown)} most suspect shown'}",
                 hashes=hashes_by_path(manifest))
    return len(table)


def write_layer_curves(results: dict, chosen: str, held: str) -> None:
    """Every layer set's curve: metrics/head_layers.csv (one row per set and L2) and its plot."""
    from matplotlib.figure import Figure

    table = pd.DataFrame([{"layers": name, "dims": r["dims"], **row, "chosen": name == chosen and i == r["best"]}
                          for name, r in results.items() for i, row in enumerate(r["rows"])])
    with atomic_path(HEAD_LAYERS) as tmp:
        table.to_csv(tmp, index=False)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, r in results.items():
        x, y = [row["log10_l2"] for row in r["rows"]], [row[f"{held}_log_loss"] for row in r["rows"]]
        ax.plot(x, y, marker="o", ms=3, lw=2.2 if name == chosen else 1.0,
                label=f"{name} ({r['dims']} dims){': chosen' if name == chosen else ''}")
        ax.plot(x[r["best"]], y[r["best"]], marker="*", ms=12 if name == chosen else 7, color=ax.lines[-1].get_color())
    ax.set_xlabel("log10 L2")
    ax.set_ylabel(f"held-out log loss ({held})")
    ax.set_title("head: layer sets and L2 by " + ("cross-validation" if held == "cv" else "val"), fontsize=10)
    ax.legend(fontsize=8)
    with atomic_path(HEAD_LAYERS_PLOT) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
