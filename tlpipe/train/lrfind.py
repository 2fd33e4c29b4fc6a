"""`tlpipe lr-find`: the learning-rate range test (Smith 2015; fastai's lr_find).

Train from the pipeline's starting point while the LR grows exponentially from `start_lr` to
`end_lr`, one batch per step, and record the loss; stop when the running (exponential moving
average) loss exceeds `stop_factor` x its best (it has diverged). The curve is then smoothed
without lag (a running median, then the moving average run forward and backward), and the
suggestion is the LR where that smoothed loss falls fastest (steepest negative slope against
log10 LR, up to its minimum) when the curve really descends (see `suggest`); on a curve with no
real descent it is the LR where the loss starts to rise, / 10; when the minimum comes too early
for a slope, the LR at the minimum / 10 (never below the start LR). The rule used is printed.

- `head`: a zero-initialized linear layer on the cached train features (data/features), with the
  fine-tuning optimizer settings (finetune.optimizer, weight_decay, momentum, batch_size,
  label_smoothing): the head LR (finetune.lr) when the head trains alone. Seconds.
- `finetune`: LP-FT's start (tlpipe.train.finetuning.start_model, as the finetune stage), the
  blocks finetune trains (finetune.unfreeze: last_n's blocks; all for `all` and for `gradual`,
  whose last epochs train all), BatchNorm statistics frozen unless finetune.train_bn_stats, the
  fine-tuning augmentation, optimizer and loss of the stage's run (tlpipe.train.finetuning.make_run), backbone LR = LR x finetune.backbone_lr_mult: the
  suggestion is for finetune.lr. Nothing is saved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from tlpipe.ingest.images import normalize_batch
from tlpipe.io import atomic_path
from tlpipe.nets.features import load_split
from tlpipe.nets.models import Classifier
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, device, progress, training_workers
from tlpipe.train import distributed, finetuning

BETA = 0.9  # loss smoothing: exponential moving average (bias-corrected) over ~10 steps


def lr_grid(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    if not 0 < start_lr < end_lr:
        raise TlpipeError(f"lr-find: need 0 < start LR < end LR, got {start_lr:g} and {end_lr:g}")
    if steps < 10:
        raise TlpipeError(f"lr-find: --steps must be at least 10, got {steps}")
    return np.geomspace(start_lr, end_lr, steps)


def ema(losses, beta: float = BETA) -> np.ndarray:
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return np.array(out)


def smooth(losses, beta: float = BETA) -> np.ndarray:
    """Zero-lag smoothing. A centred running median (5 steps) first removes single-batch spikes;
    then the moving average, forward and backward: a causal average alone lags by ~1/(1-beta)
    steps, which would shift the suggestion to larger LRs."""
    median = pd.Series(losses, dtype=float).rolling(5, center=True, min_periods=1).median().to_numpy()
    return ema(ema(median, beta)[::-1], beta)[::-1]


def suggest(lrs: np.ndarray, losses) -> tuple[float, str]:
    """(suggested LR, the rule that chose it) from a range test's raw losses.

    A curve that really descends: the steepest descent of the smoothed loss before its minimum.
    A curve with no real descent (flat, then diverging: common when starting from a good probe)
    has no meaningful steepest point; its smoothed "slope" is noise and edge effects, and chasing it
    once gave 3.5e-07 on a curve flat up to 3e-3. There the rule is the LR where the loss starts
    to rise above its flat level, / 10. "Real" means the drop from the starting level (the median
    of the first raw losses, robust to one odd batch) exceeds 2 % of it and twice the batch noise.
    """
    losses = np.asarray(losses, dtype=float)
    smoothed = smooth(losses)
    n, best = len(smoothed), int(np.argmin(smoothed))
    skip = max(2, n // 20)  # the ends of a smoothed curve are the least reliable
    start = float(np.median(losses[:max(3, skip)]))
    noise = 1.4826 * float(np.median(np.abs(losses[:best + 1] - smoothed[:best + 1])))
    tolerance = max(0.02 * abs(start), 2 * noise)
    if start - smoothed[best] <= tolerance:
        above = np.flatnonzero(smoothed[skip:] > start + tolerance)
        edge = skip + int(above[0]) - 1 if len(above) else n - 1
        return float(max(lrs[max(edge, 0)] / 10, lrs[0])), "no real descent: LR where the loss starts to rise / 10"
    if best - skip >= 3:
        slope = np.gradient(smoothed[skip:best + 1], np.log10(lrs[skip:best + 1]))
        return float(lrs[skip + int(np.argmin(slope))]), "steepest descent of the smoothed loss"
    return float(max(lrs[best] / 10, lrs[0])), "LR at the minimum smoothed loss / 10"


def range_test(step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, lrs: np.ndarray,
               stop_factor: float, desc: str) -> pd.DataFrame:
    """Run `step` (one batch: forward, return the loss) at each LR until the loss diverges."""
    mults = [g.get("lr_mult", 1.0) for g in optimizer.param_groups]
    losses, best, running = [], math.inf, 0.0
    for i, lr in enumerate(progress(lrs, desc=desc), start=1):
        for group, mult in zip(optimizer.param_groups, mults):
            group["lr"] = float(lr) * mult
        loss = step()
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        running = BETA * running + (1 - BETA) * losses[-1]
        current = running / (1 - BETA ** i)
        best = min(best, current)
        if current > stop_factor * best:
            break
    n = len(losses)
    return pd.DataFrame({"step": np.arange(n), "lr": lrs[:n], "loss": losses, "smoothed_loss": smooth(losses)})


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def head_test(lrs: np.ndarray, stop_factor: float) -> pd.DataFrame:
    params = load_params("lr-find")
    finetune = params.finetune
    torch.manual_seed(params.seed)
    train, meta = load_split("train")
    x, y = train["features"], train["labels"]
    head = torch.nn.Linear(x.shape[1], len(meta["classes"]))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    # the fine-tuning optimizer on the head alone (an empty backbone), so its settings apply as there
    optimizer = finetuning.make_optimizer(Classifier(torch.nn.Identity(), head), finetune)
    batches = _batches(len(x), finetune.batch_size, torch.Generator().manual_seed(params.seed))
    label_smoothing = finetune.label_smoothing

    def step():
        idx = next(batches)
        return F.cross_entropy(head(x[idx]), y[idx], label_smoothing=label_smoothing)
    return range_test(step, optimizer, lrs, stop_factor, "lr-find head")


def finetune_test(lrs: np.ndarray, stop_factor: float) -> pd.DataFrame:
    params = load_params("lr-find")
    finetune = params.finetune
    seed = params.seed
    start = finetuning.begin(finetune, seed)
    record, dev = start.provenance["preprocessing"], device()
    loader = torch.utils.data.DataLoader(start.train_set, batch_size=finetune.batch_size, shuffle=True,
                                         drop_last=len(start.train_set) > finetune.batch_size,
                                         num_workers=training_workers(dev),
                                         generator=torch.Generator().manual_seed(seed))
    # The stage's training run (model on the device, optimizer, loss); its LR is set per step below.
    run = finetuning.make_run(start, finetune, distributed.Group(0, 1, dev), seed)
    model, optimizer, loss_fn = run.model, run.optimizer, run.loss_fn
    # The blocks finetune trains: last_n's, or all of them (gradual's widest epochs, which the LR
    # must survive too); BatchNorm statistics frozen unless train_bn_stats, as in finetune.
    n_blocks = len(start.blocks) if finetune.unfreeze == "gradual" else finetuning.trainable_blocks(
        finetune.unfreeze, finetune.unfreeze_last_n, 1, len(start.blocks))
    finetuning.set_trainable(model, start.blocks, n_blocks, finetune.train_bn_stats)

    def batches():
        while True:  # each pass over the images is a new epoch of their seeded augmentation
            yield from loader
            start.train_set.epoch += 1
    stream = batches()

    def step():
        images, idx, repeats = next(stream)
        images = start.train_set.augment(images.to(dev), idx, repeats)
        x = normalize_batch(images, record["mean"], record["std"]).contiguous(memory_format=torch.channels_last)
        return loss_fn(model(x).float(), start.train_targets[idx].to(dev)) / len(idx)
    return range_test(step, optimizer, lrs, stop_factor, "lr-find finetune")


def plot(curve: pd.DataFrame, lr: float, rule: str, title: str, out: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(curve["lr"], curve["loss"], color="0.75", lw=0.8, label="loss")
    ax.plot(curve["lr"], curve["smoothed_loss"], color="C0", label="smoothed loss")
    ax.axvline(lr, color="C3", ls="--", label=f"suggested {lr:.2g}")
    ax.set_xscale("log")
    # Divergence makes the last losses huge; keep the informative part in view.
    low, first = curve["smoothed_loss"].min(), curve["smoothed_loss"].iloc[0]
    ax.set_ylim(low - 0.05 * abs(low), max(first, low) * 1.5 + 1e-3)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}\n({rule})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def run(target: str, steps: int, start_lr: float, end_lr: float, stop_factor: float,
        out_dir: Path) -> tuple[float, str, pd.DataFrame]:
    lrs = lr_grid(start_lr, end_lr, steps)
    curve = (head_test if target == "head" else finetune_test)(lrs, stop_factor)
    if len(curve) < 5:
        raise TlpipeError(f"lr-find {target}: the loss diverged after {len(curve)} steps; lower the start LR")
    lr, rule = suggest(curve["lr"].to_numpy(), curve["loss"].to_numpy())
    with atomic_path(out_dir / f"{target}.csv") as tmp:
        curve.to_csv(tmp, index=False)
    plot(curve, lr, rule, f"LR range test: {target}", out_dir / f"{target}.png")
    return lr, rule, curve
