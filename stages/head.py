"""head: linear probe on cached features; L2 strength chosen by stratified k-fold cross-validation.

Protocol (Kornblith et al. 2019, CLIP), with the choice made on more than a handful of images:
multinomial logistic regression by L-BFGS, one fit per grid point from the strongest L2 to the
weakest (each warm-started from the last), and the L2 with the lowest mean held-out log loss over
`head.cv_folds` stratified folds of train + val kept (log loss, not accuracy: accuracy ties are
coarse on small sets). The head is then fitted on train and val together. Its temperature comes
from the out-of-fold logits, by tlpipe.calibration's rule (T = 1 where they are too few or too
rarely wrong to fit one); they also flag suspect labels (tlpipe/audit.py). `head.cv_folds: 0` is
the classic protocol: fit on train, choose on val. Test is not read here.
"""

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from tlpipe import audit, calibration, gallery, linear
from tlpipe.features import load_split, source_of
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.manifest import hashes_by_path, read_manifest
from tlpipe.params import load_params
from tlpipe.paths import HEAD, HEAD_CONFIG, HEAD_GRID, HEAD_METRICS, SUSPECTS, SUSPECTS_GALLERY
from tlpipe.runtime import TlpipeError, run_stage

MAX_SUSPECTS_SHOWN = 40


def choose(train: dict, val: dict, n_classes: int, h, seed: int):
    """(grid rows, kept index, held-out logits and their labels, raw-feature weights, fitted on)."""
    grid = np.logspace(h.l2_min_log10, h.l2_max_log10, h.l2_steps)[::-1]
    max_iter, folds = h.max_iter, h.cv_folds
    if folds == 0:
        rows, best, (w, b) = linear.sweep(train["features"], train["labels"], val["features"], val["labels"],
                                          n_classes, grid, max_iter)
        return rows, best, val["features"].double() @ w.T + b, val["labels"], val["ids"], (w, b), "train"
    x = torch.cat([train["features"], val["features"]])
    y = torch.cat([train["labels"], val["labels"]])
    smallest = int(torch.bincount(y, minlength=n_classes).min())
    if smallest < folds:
        raise TlpipeError(f"head.cv_folds={folds}: a class has only {smallest} train + val image(s); "
                          f"lower head.cv_folds (0 chooses on val)")
    rows, best, oof, (w, b) = linear.cv_sweep(x, y, n_classes, grid, max_iter, folds, seed)
    return rows, best, oof, y, torch.cat([train["ids"], val["ids"]]), (w, b), "train+val"


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


def main() -> None:
    params = load_params("head")
    train, meta = load_split("train")
    val, _ = load_split("val")
    rows, best, held_logits, held_labels, held_ids, (weight, bias), fitted_on = choose(
        train, val, len(meta["classes"]), params.head, params.seed)
    for row in rows:
        print("  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "log10_l2" and not k.endswith("sd")))

    held = "val" if fitted_on == "train" else "cv"
    fit = calibration.calibrate(held_logits, held_labels, "val" if held == "val" else "out-of-fold")
    temperature = fit.value
    held_proba = {t: calibration.scaled_proba(held_logits, t).numpy() for t in (1.0, temperature)}

    with atomic_path(HEAD) as tmp:
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp))
    chosen = rows[best]
    write_json(HEAD_CONFIG, {"type": "linear", **source_of(meta), "l2": chosen["l2"], "fitted_on": fitted_on,
                             **fit.record(),
                             "sha256": sha256_file(HEAD)})  # of head.safetensors, checked by its readers
    # Out-of-fold probabilities judge every train + val label; val logits of the classic protocol
    # come from a model that saw no val label either, so they serve the same way.
    suspects = write_suspects(held_logits, held_labels, held_ids, temperature)
    with atomic_path(HEAD_GRID) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    y = held_labels.numpy()
    write_json(HEAD_METRICS, {
        "l2": chosen["l2"], "cv_folds": params.head.cv_folds, "fitted_on": fitted_on,
        **{k: v for k, v in chosen.items() if k not in ("l2", "log10_l2")},
        **fit.record(),
        f"{held}_ece": round(calibration.ece(y, held_proba[1.0]), 6),
        f"{held}_ece_calibrated": round(calibration.ece(y, held_proba[temperature]), 6),
        f"{held}_log_loss_calibrated": round(calibration.log_loss(held_logits, held_labels, temperature), 6),
        "suspect_labels": suspects})
    print(f"chose l2={chosen['l2']:.2e} ({held} log loss {chosen[f'{held}_log_loss']:.4f}), fitted on "
          f"{fitted_on}; {calibration.describe(fit)}; {suspects} suspect label(s) in {SUSPECTS}")


if __name__ == "__main__":
    run_stage(main)
