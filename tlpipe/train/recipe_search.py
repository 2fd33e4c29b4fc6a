"""`finetune.recipe: auto`: choose how much of the backbone to train, and how hard, on the run's own val.

A seeded successive-halving search (Jamieson & Talwalkar 2016; Li et al.'s Hyperband uses it as its
inner loop) over a small family of fine-tuning settings (`FAMILY`, the `finetune.search_family`
param names which). Every candidate is a training run (tlpipe.train.finetuning.make_run) from the same
LP start; each round trains the survivors further and scores them on val, and the worse half
(by their best val loss so far) is dropped, until one is left. Round r trains its candidates to
e0 x 2^r epochs in all, with the largest whole e0 whose total cost fits `finetune.search_budget`
(epochs of the whole train split, summed over candidates). The winner's settings then replace the
family's knobs (KNOBS) in the full fine-tuning run, which starts from the probe again; every other
`finetune` param is used as written.

The cheap signals (`signals`): training images per class, and the probe's 5-fold CV accuracy and
log loss on the cached train features at `finetune.probe_l2`: how far the frozen features are from
separating the classes. They order the family (`prior`): features that already separate the
classes (CV accuracy >= SEPARABLE) put the timid candidates first, others the bold ones first. The
order decides which candidates enter when the budget cannot afford the whole family, breaks ties,
and, where val is too small to choose (fewer than audit.MIN_VAL_PER_CLASS images in some class), is
the whole choice: the first in order runs without a search, and the stage says so.

After every candidate's round the search state goes to models/.resume/ (tlpipe.train.checkpoints), so a
killed search resumes after the last candidate-round it finished, with the result of an
uninterrupted one. Under torchrun
every candidate trains on all ranks (DDP, as the full run).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from tlpipe.nets import linear
from tlpipe.nets.features import load_split
from tlpipe.runtime import TlpipeError
from tlpipe.train import checkpoints, distributed, finetuning

# The family: each candidate sets these finetune params (KNOBS). "third" = the top third of the
# backbone's blocks. last_block is the measured `near` recipe's, all_decay the `far` recipe's,
# all the defaults' (docs/finetuning.md#recommended-settings).
KNOBS = ("unfreeze", "unfreeze_last_n", "lr", "backbone_lr_mult", "layer_decay")
FAMILY: dict[str, dict[str, Any]] = {
    "last_block": {"unfreeze": "last_n", "unfreeze_last_n": 1, "lr": 3e-4, "backbone_lr_mult": 0.1, "layer_decay": 1.0},
    "top_third": {"unfreeze": "last_n", "unfreeze_last_n": "third", "lr": 1e-3, "backbone_lr_mult": 0.1,
                  "layer_decay": 1.0},
    "all": {"unfreeze": "all", "unfreeze_last_n": 0, "lr": 1e-3, "backbone_lr_mult": 0.1, "layer_decay": 1.0},
    "all_decay": {"unfreeze": "all", "unfreeze_last_n": 0, "lr": 1e-3, "backbone_lr_mult": 0.3, "layer_decay": 0.8},
}
# From timid to bold: how far each candidate may move the pretrained features.
BOLDNESS = ("last_block", "top_third", "all", "all_decay")
# Probe CV accuracy from which the frozen features are taken to separate the classes already
# (measured: hymenoptera's probe ~0.95, where no fine-tuning beat it; sign-digits' 0.86-0.92, where
# training every block gained 5-7 points).
SEPARABLE = 0.95
CV_FOLDS = 5


class Settings:
    """The finetune params with some leaves replaced: what a candidate (or the winner) trains with."""

    def __init__(self, finetune, **overrides):
        self._finetune, self._overrides = finetune, overrides

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._overrides[name] if name in self._overrides else getattr(self._finetune, name)


def check_family(names) -> None:
    unknown = [n for n in names if n not in FAMILY]
    if unknown:
        raise TlpipeError(f"finetune.search_family: unknown candidate {unknown[0]!r} (one of {', '.join(FAMILY)})")


def knobs(name: str, n_blocks: int) -> dict[str, Any]:
    chosen = dict(FAMILY[name])
    if chosen["unfreeze_last_n"] == "third":
        chosen["unfreeze_last_n"] = max(1, math.ceil(n_blocks / 3))
    return chosen


def signals(start: finetuning.Start, finetune, seed: int) -> dict[str, float]:
    """Training images per class, and the probe's CV accuracy and log loss on the cached train
    features at finetune.probe_l2 (seconds)."""
    counts = torch.bincount(start.train_targets, minlength=len(start.provenance["classes"]))
    out = {"train_per_class_min": int(counts.min()), "train_per_class_median": float(counts.float().median())}
    folds = min(CV_FOLDS, int(counts.min()))
    if folds >= 2:
        train, _ = load_split("train")
        rows, *_ = linear.cv_curve(train["features"], train["labels"], len(counts), [finetune.probe_l2],
                                   linear.PROBE_MAX_ITER, folds, seed)
        out.update(probe_cv_accuracy=rows[0]["cv_accuracy"], probe_cv_log_loss=rows[0]["cv_log_loss"])
    return out


def prior(names, signal: dict) -> tuple[list[str], str]:
    """The family in the order the signals favour, and why."""
    timid_first = sorted(names, key=BOLDNESS.index)
    acc = signal.get("probe_cv_accuracy")
    if acc is None:
        return timid_first[::-1], "too few training images per class for a CV probe: bold candidates first"
    if acc >= SEPARABLE:
        return timid_first, f"probe CV accuracy {acc:.3f} >= {SEPARABLE}: the features separate the classes, timid first"
    return timid_first[::-1], f"probe CV accuracy {acc:.3f} < {SEPARABLE}: the features need adapting, bold first"


def plan(n: int, budget: float) -> tuple[int, list[int], int]:
    """(candidates, cumulative epochs of each round, epochs spent) of the largest successive-halving
    schedule within `budget`: first as many candidates as fit one epoch each, then the largest e0."""
    def cost(k: int, e0: int) -> tuple[list[int], int]:
        rungs, spent, alive, done = [], 0, k, 0
        while alive > 1:
            rungs.append(e0 * 2 ** len(rungs))
            spent += alive * (rungs[-1] - done)
            done, alive = rungs[-1], math.ceil(alive / 2)
        return rungs, spent
    k = n
    while k > 1 and cost(k, 1)[1] > budget:
        k -= 1
    if k <= 1:
        return 1, [], 0
    e0 = 1
    while cost(k, e0 + 1)[1] <= budget:
        e0 += 1
    return k, *cost(k, e0)


def search(start: finetuning.Start, finetune, group: distributed.Group, seed: int, val_batches, run_key: str,
           say=print) -> tuple[Settings, dict]:
    """The winner's settings and the search's report (candidates, val losses per round, cost). The
    model is left at the probe and torch's RNG reseeded, so the full run starts as it would unsearched,
    however far a resumed search had got."""
    chosen = _search(start, finetune, group, seed, val_batches, run_key, say)
    torch.manual_seed(seed)
    return chosen


def _search(start, finetune, group, seed, val_batches, run_key, say):
    import time

    began = time.perf_counter()
    names = list(finetune.search_family)
    check_family(names)
    record = start.provenance["preprocessing"]
    signal = signals(start, finetune, seed)
    order, why_order = prior(names, signal)
    kept_by, _ = finetuning.kept_by(start.provenance["classes"], finetune.ema_decay > 0)
    n_blocks = len(start.blocks)
    report = {"family": names, "budget": finetune.search_budget, "signals": signal, "order": order,
              "order_reason": why_order}
    if kept_by == "schedule":
        winner = order[0]
        report.update(chosen=winner, searched=False, reason=(
            "val too small to choose between candidates (fewer than audit.MIN_VAL_PER_CLASS images in a class): "
            f"the signals' first choice, {winner}"), rounds=[], epochs_spent=0, seconds=0.0)
        return Settings(finetune, **knobs(winner, n_blocks)), report
    k, rungs, planned = plan(len(order), finetune.search_budget)
    entrants = order[:k]
    if k == 1:
        report.update(chosen=entrants[0], searched=False, rounds=[], epochs_spent=0, seconds=0.0, reason=(
            f"finetune.search_budget {finetune.search_budget:g} cannot train two candidates an epoch each: "
            f"the signals' first choice, {entrants[0]}"))
        return Settings(finetune, **knobs(entrants[0], n_blocks)), report

    start.model.to(group.device, memory_format=torch.channels_last)
    probe_state = copy.deepcopy(start.model.state_dict())
    probe_loss, probe_acc = finetuning.evaluate(start.model, val_batches, start.targets, record, group)
    checkpoint = search_checkpoint(run_key)
    state = {"round": 0, "alive": entrants, "done": [], "scores": {n: [] for n in entrants}, "seconds": 0.0}
    saved: dict[str, tuple[dict, dict]] = {}
    resumed = checkpoint.load()
    if resumed is not None:
        tensors, state = resumed
        for name in state["done"] + [n for n in state["alive"] if state["scores"][n]]:
            saved[name] = ({k: v for k, v in tensors.items() if k.startswith(name + ".")}, state["states"][name])
        began -= state["seconds"]
        say(f"search: resuming in round {state['round'] + 1}" if state["round"] < len(rungs) else
            "search: finished before the run was stopped; its result stands")
    for r in range(state["round"], len(rungs)):
        target, done_before = rungs[r], (rungs[r - 1] if r else 0)
        for name in state["alive"]:
            if name in state["done"]:
                continue
            cand = Settings(finetune, **knobs(name, n_blocks), epochs=rungs[-1])
            start.model.load_state_dict(probe_state)
            if name not in saved:
                torch.manual_seed(seed)  # each candidate's mixing draws, whatever ran before it
            run = finetuning.make_run(start, cand, group, seed)
            progress = (finetuning.Progress.from_probe(start.model, probe_loss, probe_acc) if name not in saved else
                        finetuning.Progress.restore(*_unprefixed(*saved[name], name), run, "val_loss"))
            for epoch in range(done_before + 1, target + 1):
                train_loss = finetuning.train_one_epoch(run, epoch)
                scores = finetuning.score_on_val(start.model, run.ema, val_batches, start.targets, record, group)
                run.step_scheduler(scores["val/loss"])
                progress.end_epoch(epoch, {"train/loss": train_loss, **scores}, start.model, cand, run.ema)
            loss = min(min(h["val/loss"], h.get("val_ema/loss", math.inf)) for h in progress.history[1:])
            state["scores"][name].append({"round": r + 1, "epochs": target, "val_loss": round(loss, 6)})
            say(f"search round {r + 1}: {name} after {target} epoch(s): best val loss {loss:.4f}")
            tensors, rec = progress.state(run)
            saved[name] = ({f"{name}.{g}": {k: t.detach().clone() for k, t in named.items()}
                            for g, named in tensors.items()}, rec)
            state["done"].append(name)
            state["seconds"] = time.perf_counter() - began
            if group.is_main:
                _save(checkpoint, state, saved, probe_state)
        ranked = sorted(state["alive"], key=lambda n: (state["scores"][n][-1]["val_loss"], order.index(n)))
        state["alive"], state["done"], state["round"] = ranked[:math.ceil(len(ranked) / 2)], [], r + 1
        state["seconds"] = time.perf_counter() - began
        if group.is_main:
            _save(checkpoint, state, saved, probe_state)
    distributed.barrier(group)
    winner = state["alive"][0]
    start.model.load_state_dict(probe_state)
    best = state["scores"][winner][-1]["val_loss"]
    report.update(chosen=winner, searched=True, probe_val_loss=round(probe_loss, 6), rungs=rungs,
                  rounds=[{"candidate": n, **s} for n in entrants for s in state["scores"][n]],
                  epochs_spent=planned, beats_probe=best < probe_loss, seconds=round(time.perf_counter() - began, 1),
                  reason=f"lowest val loss after {rungs[-1]} epoch(s): {best:.4f} (the probe: {probe_loss:.4f})")
    return Settings(finetune, **knobs(winner, n_blocks)), report


def search_checkpoint(run_key: str) -> checkpoints.EpochCheckpoint:
    """The search's state, beside the full run's checkpoint (whose key it extends). It stays until the
    stage's outputs are written, so a run killed after the search does not search again."""
    return checkpoints.EpochCheckpoint(run_key + "-search")


def _unprefixed(tensors: dict, record: dict, name: str) -> tuple[dict, dict]:
    return {g[len(name) + 1:]: t for g, t in tensors.items()}, record


def _save(checkpoint: checkpoints.EpochCheckpoint, state: dict, saved: dict, probe_state: dict) -> None:
    groups = {"model": probe_state, **{g: t for tensors, _ in saved.values() for g, t in tensors.items()}}
    checkpoint.save(groups, {**state, "epoch": state["round"], "states": {n: rec for n, (_, rec) in saved.items()}})


def write_plot(path, probe_val_loss: float, search: dict | None) -> None:
    """A CSV for `dvc plots`: x = epochs trained, one column of best val loss per candidate of FAMILY
    (empty where it did not train) and the probe's as a flat line."""
    import pandas as pd

    from tlpipe.io import atomic_path

    rounds = (search or {}).get("rounds", [])
    epochs = sorted({0, *(r["epochs"] for r in rounds)})
    table = pd.DataFrame({"epochs": epochs, "probe": round(probe_val_loss, 6)})
    for name in FAMILY:  # every column always, so dvc.yaml can name them
        losses = {r["epochs"]: r["val_loss"] for r in rounds if r["candidate"] == name}
        table[name] = [(round(probe_val_loss, 6) if e == 0 else losses.get(e)) if losses else None for e in epochs]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
