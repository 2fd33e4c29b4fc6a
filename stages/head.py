"""head: linear probe on cached features; layers and L2 strength chosen by stratified k-fold cross-validation.

Protocol (Kornblith et al. 2019, CLIP), with the choice made on more than a handful of images:
multinomial logistic regression by L-BFGS, one fit per grid point from the strongest L2 to the
weakest (each warm-started from the last), and the L2 with the lowest mean held-out log loss over
`head.cv_folds` stratified folds of train + val kept (log loss, not accuracy: accuracy ties are
coarse on small sets). The head is then fitted on train and val together. Its temperature comes
from the out-of-fold logits, by tlpipe.nets.calibration's rule (T = 1 where they are too few or too
rarely wrong to fit one); they also flag suspect labels (tlpipe/ingest/audit.py). `head.cv_folds: 0` is
the classic protocol: fit on train, choose on val. Test is not read here.

`head.layers` says which cached layers the head reads (tlpipe.nets.layers): `last`, a list of keys, or
`auto`, which runs the same selection over a small family of layer sets (tlpipe.nets.layers.candidates)
and keeps the set and L2 with the lowest held-out log loss (on val with cv_folds 0: the best val
accuracy, then log loss), the last layer among them. Every set's curve is kept in
metrics/head_layers.csv and drawn in metrics/head_layers.png. The choice is tlpipe.nets.head_search;
the suspect labels, the curves and the held-out logits (by which evaluate compares the head with the
fine-tuned model on val) are written by tlpipe.report.head_report.
"""

import pandas as pd
from safetensors.torch import save_file

from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.nets import calibration, head_search, layers
from tlpipe.nets.features import load_split, provenance_of
from tlpipe.params import load_params
from tlpipe.paths import HEAD, HEAD_CONFIG, HEAD_GRID, HEAD_METRICS, SUSPECTS
from tlpipe.report import head_report
from tlpipe.runtime import run_stage


def main() -> None:
    params = load_params("head")
    head = params.head
    train, meta = load_split("train")
    val, _ = load_split("val")
    sets = head_search.layer_sets(head.layers, meta)
    parts = head_search.read_layers(sets, train, val, meta)
    held = "val" if head.cv_folds == 0 else "cv"
    results = {}
    for name, keys in sets.items():
        results[name] = r = head_search.fit_set(keys, train, val, parts, len(meta["classes"]), head, params.seed)
        row = r["rows"][r["best"]]
        print(f"layers {name} ({r['dims']} dims): l2 {row['l2']:.2e}, {held} log loss "
              f"{row[f'{held}_log_loss']:.4f}, {held} accuracy {row[f'{held}_accuracy']:.4f}")
    chosen = head_search.best(results, held)
    kept = results[chosen]
    rows, held_logits, held_labels, fitted_on = kept["rows"], kept["logits"], kept["labels"], kept["fitted_on"]
    weight, bias = kept["finish"]()

    held = "val" if fitted_on == "train" else "cv"
    fit = calibration.calibrate(held_logits, held_labels, "val" if held == "val" else "out-of-fold")
    temperature = fit.value
    held_proba = {t: calibration.scaled_proba(held_logits, t).numpy() for t in (1.0, temperature)}

    heldout_sha256 = head_report.write_heldout(held_logits, held_labels, kept["ids"])  # evaluate's val comparison
    with atomic_path(HEAD) as tmp:
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp))
    best = rows[kept["best"]]
    modules = [st["module"] for st in (meta.get("layers") or {}).get("stages", [])]
    write_json(HEAD_CONFIG, {"type": "linear", **provenance_of(meta), "layers": kept["keys"],
                             "input_dim": kept["dims"], "layer_modules": modules if kept["keys"] != [layers.LAST] else [],
                             "l2": best["l2"], "fitted_on": fitted_on, **fit.record(),
                             "sha256": sha256_file(HEAD), "heldout_sha256": heldout_sha256})  # checked by readers
    # Out-of-fold probabilities judge every train + val label; val logits of the classic protocol
    # come from a model that saw no val label either, so they serve the same way.
    suspects = head_report.write_suspects(held_proba[temperature], held_labels.numpy(), kept["ids"].numpy())
    with atomic_path(HEAD_GRID) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    head_report.write_layer_curves(results, chosen, held)
    y = held_labels.numpy()
    write_json(HEAD_METRICS, {
        "layers": chosen, "dims": kept["dims"],
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
    print(f"chose layers {chosen} ({kept['dims']} dims), l2={best['l2']:.2e} ({held} log loss "
          f"{best[f'{held}_log_loss']:.4f}), fitted on {fitted_on}; {calibration.describe(fit)}; "
          f"{suspects} suspect label(s) in {SUSPECTS}")


if __name__ == "__main__":
    run_stage(main)
