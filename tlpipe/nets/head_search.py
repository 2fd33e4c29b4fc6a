"""The head stage's choice: which cached layers the head reads and its L2 strength.

Every layer set (`layer_sets`: `head.layers: auto`'s family from tlpipe.nets.layers.candidates, or
the one set `head.layers` names) gets its L2 curve by `choose`: stratified k-fold cross-validation
on train + val (`head.cv_folds`), or with `cv_folds: 0` the classic protocol, fitted on train and
judged on val. `best` keeps the set and L2 with the lowest held-out log loss (on val: the best
accuracy, then log loss); ties go to the earlier, smaller set. Only the head stage imports this
module, so editing it reruns the head alone (and what reads the head).
"""

from __future__ import annotations

import numpy as np
import torch

from tlpipe.nets import layers, linear
from tlpipe.paths import FEATURES
from tlpipe.runtime import TlpipeError


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


def read_layers(sets: dict[str, list[str]], train: dict, val: dict, meta: dict) -> dict[str, dict]:
    """Every layer the sets name, once, for train and val: {split: {key: features}}."""
    wanted = list(dict.fromkeys(k for keys in sets.values() for k in keys))
    return {s: layers.read(s, wanted, t, meta, FEATURES) for s, t in (("train", train), ("val", val))}


def fit_set(keys: list[str], train: dict, val: dict, parts: dict[str, dict], n_classes: int, head,
            seed: int) -> dict:
    """One layer set's curve (`choose` on its concatenated features): rows, best, logits, labels,
    ids, finish, fitted_on, keys and dims."""
    inputs = [{**t, "features": layers.concat(parts[s], keys)} for s, t in (("train", train), ("val", val))]
    r = dict(zip(("rows", "best", "logits", "labels", "ids", "finish", "fitted_on"),
                 choose(*inputs, n_classes, head, seed)))
    return {**r, "keys": keys, "dims": inputs[0]["features"].shape[1]}


def score(row: dict, held: str) -> tuple:
    """Lower is better: CV picks by held-out log loss; the val protocol by accuracy, then log loss."""
    return (row["cv_log_loss"],) if held == "cv" else (-row["val_accuracy"], row["val_log_loss"])


def best(results: dict[str, dict], held: str) -> str:
    """The name of the kept set: the best score at its own best L2; dict order breaks ties (the
    earlier, smaller set, the last layer first)."""
    return min(results, key=lambda name: score(results[name]["rows"][results[name]["best"]], held))
