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
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile (as tlpipe.report.metrics)
# Neither side of SEPARABLE: the CV accuracy's 95 % Wilson interval (over the training images) holds
# it. Then the signal says nothing, and the order is UNDECIDED's: timid first, the candidate that moves
# the pretrained model least, as the one-standard-error rule prefers the simplest model the data
# cannot tell from the best (docs/finetuning.md says why).
UNDECIDED = "timid first"
# Every candidate's first round trains at least this many optimizer steps past the search's warmup
# before it is judged (docs/finetuning.md: the measurement behind it), and at least one epoch.
MIN_STEPS_PAST_WARMUP = 20
# Two candidates' best val losses closer than this many standard errors of their paired per-image
# difference are a tie, decided by the signals' order (the one-standard-error rule).
TIE_SE = 1.0


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
    out = {"train_images": int(counts.sum()), "train_per_class_min": int(counts.min()),
           "train_per_class_median": float(counts.float().median())}
    folds = min(CV_FOLDS, int(counts.min()))
    if folds >= 2:
        train, _ = load_split("train")
        rows, *_ = linear.cv_curve(train["features"], train["labels"], len(counts), [finetune.probe_l2],
                                   linear.PROBE_MAX_ITER, folds, seed)
        out.update(probe_cv_accuracy=rows[0]["cv_accuracy"], probe_cv_log_loss=rows[0]["cv_log_loss"])
    return out


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (tlpipe.report.metrics.wilson's,
    here so that a change to the report's code does not rerun fine-tuning)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def prior(names, signal: dict) -> tuple[list[str], str]:
    """The family in the order the signals favour, and why."""
    timid_first = sorted(names, key=BOLDNESS.index)
    acc = signal.get("probe_cv_accuracy")
    if acc is None:
        return timid_first[::-1], "too few training images per class for a CV probe: bold candidates first"
    low, high = wilson(acc, int(signal.get("train_images", 0)))
    band = f"95 % interval {low:.3f}-{high:.3f}"
    if low <= SEPARABLE <= high:
        return timid_first, (f"probe CV accuracy {acc:.3f} ({band}) is within its noise of {SEPARABLE}: "
                             f"undecided, {UNDECIDED}")
    if acc >= SEPARABLE:
        return timid_first, (f"probe CV accuracy {acc:.3f} ({band}) >= {SEPARABLE}: the features separate "
                             "the classes, timid first")
    return timid_first[::-1], (f"probe CV accuracy {acc:.3f} ({band}) < {SEPARABLE}: the features need adapting, "
                               "bold first")


def plan(n: int, budget: float, steps_per_epoch: int = 1, warmup_share: float = 0.0,
         min_steps: int = 0) -> tuple[int, list[int], int]:
    """(candidates, cumulative epochs of each round, epochs spent) of the largest successive-halving
    schedule within `budget` epochs: first as many candidates as fit, then the longest first round.
    A candidate trains the full run's schedule shrunk to the last round's length, so its warmup is
    `warmup_share` of it; the first round must hold at least `min_steps` optimizer steps past that
    warmup (and at least an epoch)."""
    def cost(k: int, e0: int) -> tuple[list[int], int]:
        rungs, spent, alive, done = [], 0, k, 0
        while alive > 1:
            rungs.append(e0 * 2 ** len(rungs))
            spent += alive * (rungs[-1] - done)
            done, alive = rungs[-1], math.ceil(alive / 2)
        return rungs, spent

    def enough(k: int, e0: int) -> bool:
        rungs, _ = cost(k, e0)
        return e0 * steps_per_epoch - round(warmup_share * rungs[-1] * steps_per_epoch) >= min_steps

    for k in range(n, 1, -1):
        e0 = 1
        while cost(k, e0)[1] <= budget and not enough(k, e0):
            e0 += 1
        if cost(k, e0)[1] > budget:
            continue
        while cost(k, e0 + 1)[1] <= budget:
            e0 += 1
        return k, *cost(k, e0)
    return 1, [], 0


def steps_past_warmup(rungs: list[int], steps_per_epoch: int, warmup_share: float) -> int:
    """Optimizer steps of the first round after the search's (shrunk) warmup."""
    return rungs[0] * steps_per_epoch - round(warmup_share * rungs[-1] * steps_per_epoch) if rungs else 0


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of the mean of the per-image differences a - b (the same val images)."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else math.inf


def rank(alive: list[str], loss: dict[str, float], per_image: dict[str, torch.Tensor],
         order: list[str]) -> tuple[list[str], list[str], float]:
    """`alive` best first, the tie rule applied: every candidate within TIE_SE paired standard errors
    of the lowest val loss ties with it, and the tied ones go first in the signals' `order`; the rest
    follow by val loss. Also the tied names and the leader's largest standard error."""
    leader = min(alive, key=lambda n: (loss[n], order.index(n)))
    tied, widest = [], 0.0
    for n in alive:
        se = 0.0 if n == leader else paired_se(per_image[n], per_image[leader])
        if loss[n] - loss[leader] <= TIE_SE * se:
            tied.append(n)
            widest = max(widest, se)
    rest = sorted((n for n in alive if n not in tied), key=lambda n: (loss[n], order.index(n)))
    return sorted(tied, key=order.index) + rest, tied, widest


@torch.inference_mode()
def val_losses(model, batches, targets: torch.Tensor, record: dict,
               group: distributed.Group) -> tuple[torch.Tensor, float]:
    """Every val image's cross-entropy (in the order of the manifest's ids) and the val accuracy,
    over all ranks."""
    import torch.nn.functional as F

    from tlpipe.ingest.images import normalize_batch

    model.eval()
    dev, amp = group.device, group.device.type == "cuda"
    dense = torch.zeros(2, len(targets), dtype=torch.float64)  # loss, present
    correct = 0
    for images, ids in batches:
        x = normalize_batch(images.to(dev, non_blocking=True), record["mean"], record["std"])
        y = targets[ids].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        dense[0, ids] = F.cross_entropy(logits, y, reduction="none").double().cpu()
        dense[1, ids] = 1.0
        correct += int((logits.argmax(1) == y).sum())
    if group.world > 1:
        summed = distributed.all_sum(group, correct, *dense.flatten().tolist())
        correct, dense = summed[0], torch.tensor(summed[1:], dtype=torch.float64).view(2, -1)
    present = dense[1] > 0
    return dense[0][present], correct / max(1, int(present.sum()))


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
    signals_seconds = round(time.perf_counter() - began, 1)
    order, why_order = prior(names, signal)
    kept_by, _ = finetuning.kept_by(start.provenance["classes"], finetune.ema_decay > 0)
    n_blocks = len(start.blocks)
    steps = max(1, len(start.train_set) // finetune.batch_size) if len(start.train_set) > finetune.batch_size else 1
    share = finetune.warmup_epochs / finetune.epochs if finetune.schedule == "cosine" else 0.0
    budget_epochs = finetune.search_budget * finetune.epochs
    report = {"family": names, "budget": finetune.search_budget, "budget_epochs": round(budget_epochs, 3),
              "signals": signal, "order": order, "order_reason": why_order, "steps_per_epoch": steps,
              "min_steps_past_warmup": MIN_STEPS_PAST_WARMUP, "signals_seconds": signals_seconds}
    if kept_by == "schedule":
        winner = order[0]
        report.update(chosen=winner, searched=False, reason=(
            "val too small to choose between candidates (fewer than audit.MIN_VAL_PER_CLASS images in a class): "
            f"the signals' first choice, {winner}"), rounds=[], epochs_spent=0, seconds=0.0)
        return Settings(finetune, **knobs(winner, n_blocks)), report
    k, rungs, planned = plan(len(order), budget_epochs, steps, share, MIN_STEPS_PAST_WARMUP)
    entrants = order[:k]
    if k == 1:
        report.update(chosen=entrants[0], searched=False, rounds=[], epochs_spent=0, seconds=0.0, reason=(
            f"finetune.search_budget {finetune.search_budget:g} x {finetune.epochs} epochs cannot train two "
            f"candidates {MIN_STEPS_PAST_WARMUP} steps past their warmup: the signals' first choice, {entrants[0]}"))
        return Settings(finetune, **knobs(entrants[0], n_blocks)), report
    # the full run's schedule shrunk to the search's length: its warmup the same share of it
    warmup = share * rungs[-1] if finetune.schedule == "cosine" else finetune.warmup_epochs
    report.update(warmup_steps=round(share * rungs[-1] * steps),
                  first_round_steps_past_warmup=steps_past_warmup(rungs, steps, share))

    start.model.to(group.device, memory_format=torch.channels_last)
    probe_state = copy.deepcopy(start.model.state_dict())
    probe_loss, probe_acc = finetuning.evaluate(start.model, val_batches, start.targets, record, group)
    checkpoint = search_checkpoint(run_key)
    state = {"round": 0, "alive": entrants, "done": [], "scores": {n: [] for n in entrants}, "seconds": 0.0,
             "ties": [], "per_image": {}}
    saved: dict[str, tuple[dict, dict]] = {}
    resumed = checkpoint.load()
    if resumed is not None:
        tensors, state = resumed
        for name in state["done"] + [n for n in state["alive"] if state["scores"][n]]:
            saved[name] = ({k: v for k, v in tensors.items() if k.startswith(name + ".")}, state["states"][name])
        began -= state["seconds"]
        say(f"search: resuming in round {state['round'] + 1}" if state["round"] < len(rungs) else
            "search: finished before the run was stopped; its result stands")
    per_image = {n: torch.tensor(v, dtype=torch.float64) for n, v in state["per_image"].items()}
    for r in range(state["round"], len(rungs)):
        target, done_before, last = rungs[r], (rungs[r - 1] if r else 0), r == len(rungs) - 1
        for name in state["alive"]:
            if name in state["done"]:
                continue
            cand = Settings(finetune, **knobs(name, n_blocks), epochs=rungs[-1], warmup_epochs=warmup)
            start.model.load_state_dict(probe_state)
            if name not in saved:
                torch.manual_seed(seed)  # each candidate's mixing draws, whatever ran before it
            run = finetuning.make_run(start, cand, group, seed)
            progress = (finetuning.Progress.from_probe(start.model, probe_loss, probe_acc) if name not in saved else
                        finetuning.Progress.restore(*_unprefixed(*saved[name], name), run, "val_loss"))
            for epoch in range(done_before + 1, target + 1):
                train_loss = finetuning.train_one_epoch(run, epoch)
                scores = {}
                for key, module in (("val", start.model), ("val_ema", None if run.ema is None else run.ema.module)):
                    if module is None:
                        continue
                    losses, acc = val_losses(module, val_batches, start.targets, record, group)
                    scores.update({f"{key}/loss": float(losses.mean()), f"{key}/accuracy": acc})
                    if name not in per_image or float(losses.mean()) < float(per_image[name].mean()):
                        per_image[name] = losses  # the per-image losses of its best epoch so far
                run.step_scheduler(scores["val/loss"])
                progress.end_epoch(epoch, {"train/loss": train_loss, **scores}, start.model, cand, run.ema)
            loss = min(min(h["val/loss"], h.get("val_ema/loss", math.inf)) for h in progress.history[1:])
            state["scores"][name].append({"round": r + 1, "epochs": target, "val_loss": round(loss, 6)})
            state["per_image"][name] = per_image[name].tolist()  # JSON keeps a float64 exactly
            say(f"search round {r + 1}: {name} after {target} epoch(s): best val loss {loss:.4f}")
            tensors, rec = progress.state(run)
            # a candidate's weights are kept only while it may train again (not after the last round)
            saved[name] = ({} if last else {f"{name}.{g}": {k: t.detach().clone() for k, t in named.items()}
                                            for g, named in tensors.items()}, rec)
            state["done"].append(name)
            state["seconds"] = time.perf_counter() - began
            if group.is_main:
                _save(checkpoint, state, saved, probe_state)
        losses_now = {n: state["scores"][n][-1]["val_loss"] for n in state["alive"]}
        ranked, tied, se = rank(state["alive"], losses_now, per_image, order)
        if len(tied) > 1:
            state["ties"].append({"round": r + 1, "tied": tied, "paired_se": round(se, 6), "first": ranked[0]})
            say(f"search round {r + 1}: {', '.join(tied)} within {TIE_SE:g} paired standard error of the lowest "
                f"val loss: a tie, {ranked[0]} first by the signals' order")
        state["alive"], state["done"], state["round"] = ranked[:math.ceil(len(ranked) / 2)], [], r + 1
        saved = {n: v for n, v in saved.items() if n in state["alive"]}  # the dropped never train again
        state["seconds"] = time.perf_counter() - began
        if group.is_main:
            _save(checkpoint, state, saved, probe_state)
    distributed.barrier(group)
    winner = state["alive"][0]
    start.model.load_state_dict(probe_state)
    best = state["scores"][winner][-1]["val_loss"]
    tie = [t for t in state["ties"] if t["round"] == len(rungs)]
    report.update(chosen=winner, searched=True, probe_val_loss=round(probe_loss, 6), rungs=rungs,
                  rounds=[{"candidate": n, **s} for n in entrants for s in state["scores"][n]],
                  ties=state["ties"], epochs_spent=planned, planned_fraction=round(planned / finetune.epochs, 3),
                  beats_probe=best < probe_loss, seconds=round(time.perf_counter() - began, 1),
                  reason=(f"lowest val loss after {rungs[-1]} epoch(s): {best:.4f} (the probe: {probe_loss:.4f})"
                          if not tie else f"tied within {TIE_SE:g} paired standard error ({', '.join(tie[0]['tied'])}) "
                          f"after {rungs[-1]} epoch(s): the signals' order; {best:.4f} (the probe: {probe_loss:.4f})"))
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
