"""head: linear probe on cached features; layers and L2 strength chosen by stratified k-fold cross-validation.

Protocol (Kornblith et al. 2019, CLIP), with the choice made on more than a handful of images:
multinomial logistic regression by L-BFGS, one fit per grid point from the strongest L2 to the
weakest (each warm-started from the last), and the L2 with the lowest mean held-out log loss over
`head.cv_folds` stratified folds of train + val kept (log loss, not accuracy: accuracy ties are
coarse on small sets). The head is then fitted on train and val together. Its temperature comes
from the out-of-fold logits, by tlpipe.nets.calibration's rule (T = 1 where they are too few or too
rarely wrong to fit one); they also flag suspect labels (tlpipe/ingest/audit.py). `head.cv_folds: 0` is
the classic protocol: fit on train, choose on val. Test is not read here.

`head.layers` says which cached layers the probe reads (tlpipe.nets.layers): `last`, a list of keys, or
`auto`, which runs the same selection over a small family of layer sets (tlpipe.nets.layers.candidates)
and keeps the set and L2 with the lowest held-out log loss (on val with cv_folds 0: the best val
accuracy, then log loss), the last layer among them. Every set's curve is kept in
metrics/head_layers.csv and drawn in metrics/head_layers.png.
"""

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from tlpipe.ingest import audit
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.manifest import hashes_by_path, read_manifest
from tlpipe.nets import calibration, layers, linear
from tlpipe.nets.features import load_split, provenance_of
from tlpipe.params import load_params
from tlpipe.paths import (FEATURES, HEAD, HEAD_CONFIG, HEAD_GRID, HEAD_LAYERS, HEAD_LAYERS_PLOT, HEAD_METRICS,
                          SUSPECTS, SUSPECTS_GALLERY)
from tlpipe.report import gallery
from tlpipe.runtime import TlpipeError, run_stage

MAX_SUSPECTS_SHOWN = 40


def choose(train: dict, val: dict, n_classes: int, head, seed: int):
    """(grid rows, kept index, held-out logits and their labels and ids, finish() -> raw-feature
    weights, fitted on). train/val: {"features", "labels", "ids"}."""
    grid = np.logspace(head.l2_min_log10, head.l2_max_log10, head.l2_steps)[::-1]
    max_iter, folds = head.max_iter, head.cv_folds
    if folds == 0:
        rows, best, (w, b) = linear.sweep(train["features"], train["labels"], val["features"], val["labels"],
                                          n_classes, grid, max_iter)
        return rows, best, val["features"].double() @ w.T + b, val["labels"], val["ids"], lambda: (w, b), "train"
    x = torch.cat([train["features"], val["features"]])
    y = torch.cat([train["labels"], val["labels"]])
    smallest = int(torch.bincount(y, minlength=n_classes).min())
    if smallest < folds:
        raise TlpipeError(f"head.cv_folds={folds}: a class has only {smallest} train + val image(s); "
                          f"lower head.cv_folds (0 chooses on val)")
    rows, best, oof, finish = linear.cv_curve(x, y, n_classes, grid, max_iter, folds, seed)
    return rows, best, oof, y, torch.cat([train["ids"], val["ids"]]), finish, "train+val"


def layer_sets(setting, meta: dict) -> dict[str, list[str]]:
    """The layer sets to try, by name: auto's family, or the one set head.layers names."""
    if setting == "auto":
        sets = layers.candidates(meta)
    else:
        keys = [setting] if isinstance(setting, str) else list(setting)
        sets = {"+".join(keys): keys}
    for keys in sets.values():
        layers.check_keys(keys, meta, "head.layers")
    return sets


def score(row: dict, held: str) -> tuple:
    """Lower is better: CV picks by held-out log loss; the val protocol by accuracy, then log loss."""
    return (row["cv_log_loss"],) if held == "cv" else (-row["val_accuracy"], row["val_log_loss"])


def write_suspects(oof: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, temperature: float) -> int:
    manifest, classes = read_manifest()
    proba = calibration.scaled_proba(oof, temperature).numpy()
    found = audit.suspect_labels(proba, labels.numpy())
    rows = manifest.loc[ids.numpy()[found["index"]]]
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


def main() -> None:
    params = load_params("head")
    head = params.head
    train, meta = load_split("train")
    val, _ = load_split("val")
    sets = layer_sets(head.layers, meta)
    wanted = list(dict.fromkeys(k for keys in sets.values() for k in keys))
    parts = {s: layers.read(s, wanted, t, meta, FEATURES) for s, t in (("train", train), ("val", val))}
    held = "val" if head.cv_folds == 0 else "cv"
    results = {}
    for name, keys in sets.items():
        inputs = [{**t, "features": layers.concat(parts[s], keys)} for s, t in (("train", train), ("val", val))]
        r = dict(zip(("rows", "best", "logits", "labels", "ids", "finish", "fitted_on"),
                     choose(*inputs, len(meta["classes"]), head, params.seed)))
        results[name] = {**r, "keys": keys, "dims": inputs[0]["features"].shape[1]}
        row = r["rows"][r["best"]]
        print(f"layers {name} ({results[name]['dims']} dims): l2 {row['l2']:.2e}, {held} log loss "
              f"{row[f'{held}_log_loss']:.4f}, {held} accuracy {row[f'{held}_accuracy']:.4f}")
    # dict order breaks ties: the earlier, smaller set (the last layer first)
    chosen = min(results, key=lambda name: score(results[name]["rows"][results[name]["best"]], held))
    c = results[chosen]
    rows, held_logits, held_labels, fitted_on = c["rows"], c["logits"], c["labels"], c["fitted_on"]
    weight, bias = c["finish"]()

    held = "val" if fitted_on == "train" else "cv"
    fit = calibration.calibrate(held_logits, held_labels, "val" if held == "val" else "out-of-fold")
    temperature = fit.value
    held_proba = {t: calibration.scaled_proba(held_logits, t).numpy() for t in (1.0, temperature)}

    with atomic_path(HEAD) as tmp:
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp))
    best = rows[c["best"]]
    modules = [st["module"] for st in (meta.get("layers") or {}).get("stages", [])]
    write_json(HEAD_CONFIG, {"type": "linear", **provenance_of(meta), "layers": c["keys"], "input_dim": c["dims"],
                             "layer_modules": modules if c["keys"] != [layers.LAST] else [],
                             "l2": best["l2"], "fitted_on": fitted_on, **fit.record(),
                             "sha256": sha256_file(HEAD)})  # of head.safetensors, checked by its readers
    # Out-of-fold probabilities judge every train + val label; val logits of the classic protocol
    # come from a model that saw no val label either, so they serve the same way.
    suspects = write_suspects(held_logits, held_labels, c["ids"], temperature)
    with atomic_path(HEAD_GRID) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    write_layer_curves(results, chosen, held)
    y = held_labels.numpy()
    write_json(HEAD_METRICS, {
        "layers": chosen, "dims": c["dims"],
        "l2": best["l2"], "cv_folds": head.cv_folds, "fitted_on": fitted_on,
        **{k: v for k, v in best.items() if k not in ("l2", "log10_l2")},
        **fit.record(),
        f"{held}_ece": round(calibration.ece(y, held_proba[1.0]), 6),
        f"{held}_ece_calibrated": round(calibration.ece(y, held_proba[temperature]), 6),
        f"{held}_log_loss_calibrated": round(calibration.log_loss(held_logits, held_labels, temperature), 6),
        "suspect_labels": suspects,
        "layer_sets": {name: {"dims": r["dims"], "l2": r["rows"][r["best"]]["l2"],
                              f"{held}_log_loss": r["rows"][r["best"]][f"{held}_log_loss"],
                              f"{held}_accuracy": r["rows"][r["best"]][f"{held}_accuracy"]}
                       for name, r in results.items()}})
    print(f"chose layers {chosen} ({c['dims']} dims), l2={best['l2']:.2e} ({held} log loss "
          f"{best[f'{held}_log_loss']:.4f}), fitted on {fitted_on}; {calibration.describe(fit)}; "
          f"{suspects} suspect label(s) in {SUSPECTS}")


if __name__ == "__main__":
    run_stage(main)
