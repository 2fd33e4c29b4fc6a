"""Fine-tuning, in the shape of torchvision's references/classification/train.py.

- `start_model`: LP-FT's start (Kumar et al. 2022): the linear probe fitted on the cached train
  features at `finetune.probe_l2`, put on the pretrained backbone the features came from, and the
  training images with the fine-tuning augmentation. Epoch 0 therefore scores the probe, and the
  first gradients do not wreck the pretrained features as a random head's would.
- `make_optimizer` / `make_scheduler`: discriminative learning rates (backbone LR = head LR x
  `backbone_lr_mult`, optionally decayed layer by layer), no weight decay on biases and norms;
  cosine with warmup, or plateau.
- `make_loss`, `make_mixing`, `make_ema`: label smoothing and class weights, MixUp/CutMix, an
  exponential moving average of the weights.
- `set_trainable`: which backbone blocks train in an epoch (`unfreeze`: all, last_n, gradual).
- `begin`, `Run`, `make_run`: the seeded start, and one training run from it (batches, optimizer,
  scheduler, loss, mixing, EMA) built in one place; the stage, the recipe search
  (tlpipe.train.recipe_search), `tlpipe lr-find finetune` and bench/finetune.py all use them.
- `train_one_epoch(run, epoch)`, `evaluate`: one pass over the training batches, one over val.
- `kept_by`: which weights a run keeps. With a val of at least `audit.MIN_VAL_PER_CLASS` images in
  every class, the epoch with the lowest val loss, and early stopping; below it, the last epoch of
  the schedule (its EMA when there is one), and no early stopping: a dozen val images cannot
  choose an epoch (docs/finetuning.md).
- `Progress`: the epoch record, the kept epoch so far and early stopping, saved with the weights
  after every epoch so a killed run resumes with the result of an uninterrupted one.

The finetune stage runs these; `tlpipe lr-find finetune` uses the same start and optimizer, so the
LR it suggests is for the model and optimizer the stage trains.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlpipe.ingest import audit
from tlpipe.ingest.decoded import TRAIN_SOURCE, DecodedSplit
from tlpipe.ingest.images import TrainImages, normalize_batch, train_transform
from tlpipe.manifest import read_manifest
from tlpipe.nets import backbones, linear
from tlpipe.nets.features import load_split
from tlpipe.nets.models import Classifier, linear_from
from tlpipe.paths import CLASSES, FEATURES
from tlpipe.runtime import TlpipeError, progress, training_workers
from tlpipe.train import checkpoints, distributed


@dataclass
class Start:
    model: Classifier               # the probe on the pretrained backbone, on the CPU
    blocks: list[list]              # the backbone's blocks, input to output: the units of unfreezing
    provenance: dict                # the features metadata's PROVENANCE_KEYS: backbone, weights, classes, preprocessing
    train_set: TrainImages          # training images -> (uint8 image, position, repeat), and their augmentation
    train_targets: torch.Tensor     # class index of each training image, by position
    targets: torch.Tensor           # class index of every manifest row (val batches carry row ids)


def start_model(finetune, seed: int) -> Start:
    """LP-FT's starting point from params.yaml's `finetune` section. `seed` seeds each image's
    augmentation by (seed, epoch, image)."""
    train_features, provenance = load_split("train")
    classes = provenance["classes"]
    weight, bias = linear.fit_probe(train_features["features"], train_features["labels"], len(classes),
                                    finetune.probe_l2)
    backbone = backbones.pretrained_for(provenance, str(FEATURES / "meta.json"))
    model = Classifier(backbone.trunk, linear_from(weight.float(), bias.float()))
    manifest, manifest_classes = read_manifest()
    if manifest_classes != classes:
        raise TlpipeError(f"{FEATURES / 'meta.json'}: classes differ from {CLASSES}; rerun the features stage")
    targets = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    rows = torch.tensor(manifest.index[manifest["split"] == "train"].to_numpy())
    source_pixels = DecodedSplit(TRAIN_SOURCE)
    if not torch.equal(source_pixels.ids(), rows):
        raise TlpipeError(f"{source_pixels.folder}: its {TRAIN_SOURCE} images are not the manifest's train split; "
                          "rerun the decode stage")
    record = provenance["preprocessing"]
    train_set = TrainImages(source_pixels, train_transform(
        record["img_size"], record["interpolation"], finetune.crop_scale_min, finetune.hflip,
        finetune.randaugment_magnitude), seed)
    return Start(model, backbones.blocks(provenance["backbone"], model.trunk), provenance, train_set,
                 targets[rows], targets)


def kept_by(classes: list[str], ema: bool) -> tuple[str, str]:
    """("val_loss" or "schedule", why): how the run chooses the weights it keeps, from val's size."""
    manifest, _ = read_manifest()
    counts = audit.val_counts(manifest, classes)
    smallest = f"val has {counts['val_min_per_class']} image(s) in its smallest class"
    if not counts["val_too_small"]:
        return "val_loss", (f"{smallest} (>= {audit.MIN_VAL_PER_CLASS}): the epoch with the lowest val loss is kept, "
                            "with early stopping")
    return "schedule", (f"{smallest} (< {audit.MIN_VAL_PER_CLASS}), too few to choose an epoch: the last "
                        f"{'one (its EMA)' if ema else 'one'} is kept, no early stopping")


def check_batch_size(finetune, world: int) -> None:
    """`finetune.batch_size` is the global batch, shared by `world` processes."""
    if finetune.train_bn_stats and finetune.batch_size < 2 * world:
        raise TlpipeError(f"finetune.train_bn_stats needs at least 2 images per process and batch: "
                          f"finetune.batch_size ({finetune.batch_size}) < 2 x {world} processes")
    if finetune.batch_size < world:
        raise TlpipeError(f"finetune.batch_size ({finetune.batch_size}) is the global batch: it must be at least "
                          f"the number of processes ({world})")


def trainable_blocks(strategy: str, last_n: int, epoch: int, total: int) -> int:
    """How many of the backbone's top blocks train in `epoch` (1-based)."""
    if strategy == "all":
        return total
    if strategy == "last_n":
        return min(last_n, total)
    return min(epoch - 1, total)  # gradual: head alone first, then one more block each epoch


def set_trainable(model: Classifier, blocks: list[list], n: int, train_bn_stats: bool) -> None:
    """Train the head and the top `n` blocks; freeze the rest.

    BatchNorm running statistics stay frozen unless train_bn_stats: with small batches, batch
    statistics differ from the pretrained running ones, so the first train-mode forward would not
    be the model the probe was fitted on, and the probe's large weights turn that into a huge loss.
    """
    model.trunk.eval()
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - n:]:
        for item in block:  # a module, or a loose parameter such as a ViT's class token
            if isinstance(item, nn.Module):
                item.train()
            for p in backbones.parameters(item):
                p.requires_grad_(True)
    if not train_bn_stats:
        for module in model.trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    model.head.train()


def lr_multipliers(model: Classifier, blocks: list[list], finetune) -> list[tuple[list, float]]:
    """(parameters, LR / head LR) pairs, backbone first and the head last.

    With `layer_decay` < 1 (layer-wise LR decay, as timm and BEiT do it) the backbone is split into
    its blocks, top first: the top block gets `backbone_lr_mult`, each block below `layer_decay`
    times the one above, so the generic low-level features move least."""
    head = (list(model.head.parameters()), 1.0)
    if finetune.layer_decay == 1 or not blocks:
        return [(list(model.trunk.parameters()), finetune.backbone_lr_mult), head]
    parts, seen = [], set()
    for depth, block in enumerate(reversed(blocks)):
        params = [p for item in block for p in backbones.parameters(item) if id(p) not in seen]
        seen.update(id(p) for p in params)
        parts.append((params, finetune.backbone_lr_mult * finetune.layer_decay ** depth))
    rest = [p for p in model.trunk.parameters() if id(p) not in seen]  # none for the known backbones
    return parts + ([(rest, finetune.backbone_lr_mult * finetune.layer_decay ** len(blocks))] if rest else []) + [head]


def make_optimizer(model: Classifier, finetune, blocks: list[list] = ()) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter groups (`lr_multipliers`), each split into weights with weight
    decay and biases and norms without. Each group's `lr_mult` is its LR over the head's (`finetune.lr`),
    so an LR schedule or a range test sets every group from one number. Frozen parameters stay in
    the groups (the optimizer skips them while they have no gradient), so unfreezing needs no new
    optimizer."""
    groups = []
    for params, mult in lr_multipliers(model, list(blocks), finetune):
        groups += [{"params": [p for p in params if p.ndim > 1], "lr": finetune.lr * mult, "lr_mult": mult,
                    "weight_decay": finetune.weight_decay},
                   {"params": [p for p in params if p.ndim <= 1], "lr": finetune.lr * mult, "lr_mult": mult,
                    "weight_decay": 0.0}]
    if finetune.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=finetune.momentum, nesterov=finetune.momentum > 0)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, finetune, steps_per_epoch: int):
    """Cosine (stepped per batch, after `warmup_epochs` of linear warmup, rounded to whole steps: the
    recipe search shrinks it to a fraction of an epoch) or reduce-on-plateau (stepped per epoch on val loss)."""
    if finetune.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(round(finetune.warmup_epochs * steps_per_epoch), finetune.epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=max(1, finetune.patience // 2))


def class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """n / (classes x count): each class weighs the same in the loss (scikit-learn's "balanced")."""
    counts = torch.bincount(targets, minlength=n_classes).double()
    return (len(targets) / (n_classes * counts.clamp(min=1))).float()


def make_loss(finetune, train_targets: torch.Tensor, n_classes: int):
    """Summed cross-entropy with label smoothing and, for `class_balance: loss_weights`, class
    weights; it takes class indices or (mixed) class probabilities as targets."""
    weight = class_weights(train_targets, n_classes) if finetune.class_balance == "loss_weights" else None

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = None if weight is None else weight.to(logits.device)
        return F.cross_entropy(logits, y, weight=w, label_smoothing=finetune.label_smoothing, reduction="sum")
    return loss


def make_mixing(finetune, n_classes: int):
    """MixUp and/or CutMix (torchvision transforms.v2) on a share `mix_prob` of the batches, or None.

    They draw from torch's global RNG in the main process, whose state the checkpoint keeps, so a
    resumed run mixes the same batches the same way."""
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=finetune.mixup_alpha, num_classes=n_classes)] if finetune.mixup_alpha > 0 else []) + \
            ([v2.CutMix(alpha=finetune.cutmix_alpha, num_classes=n_classes)] if finetune.cutmix_alpha > 0 else [])
    if not mixes or finetune.mix_prob == 0:
        return None
    mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def apply(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand(())) >= finetune.mix_prob:
            return x, F.one_hot(y, n_classes).float()
        return mix(x, y)
    return apply


def make_ema(model: nn.Module, finetune):
    """An exponential moving average of the weights, updated after every step, or None.

    torch's AveragedModel with `use_buffers`, so BatchNorm statistics are averaged with the
    weights; the first update copies the model."""
    if finetune.ema_decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(finetune.ema_decay), use_buffers=True)



def begin(finetune, seed: int) -> Start:
    """Seed every RNG from `seed` (Python, numpy, torch; cuDNN's autotuner off) and build LP-FT's
    start: the one opening of the finetune stage, `tlpipe lr-find finetune` and bench/finetune.py."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    return start_model(finetune, seed)


@dataclass
class Run:
    """One training run from a `Start` with one set of `finetune` params: the batches
    (class-balanced draws when `class_balance: sampler`), optimizer, scheduler, loss, MixUp/CutMix
    and EMA. Built by `make_run`; `train_one_epoch(run, epoch)` trains it for an epoch."""
    start: Start
    finetune: Any                            # the finetune params (tlpipe.params' section, or the same fields)
    group: distributed.Group
    batches: distributed.GlobalBatches
    optimizer: torch.optim.Optimizer
    scheduler: Any                           # LambdaLR (cosine) or ReduceLROnPlateau
    loss_fn: Callable
    mixing: Callable | None = None
    ema: Any = None                          # AveragedModel, or None
    checkpoint_folder: Path | None = None    # named in the error a diverging loss raises

    @property
    def model(self) -> Classifier:
        return self.start.model

    def step_scheduler(self, val_loss: float | None = None) -> None:
        """The one place the LR schedule moves: cosine after every optimizer step (`val_loss` None),
        plateau after every epoch, on its val loss."""
        if self.finetune.schedule == "cosine" and val_loss is None:
            self.scheduler.step()
        elif self.finetune.schedule == "plateau" and val_loss is not None:
            self.scheduler.step(val_loss)

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """The DataLoader of `epoch`'s batches, its augmentation seeded by (seed, epoch, image)."""
        dev = self.group.device
        self.start.train_set.epoch = self.batches.epoch = epoch
        return torch.utils.data.DataLoader(self.start.train_set, batch_sampler=self.batches,
                                           num_workers=training_workers(dev), pin_memory=dev.type == "cuda")

    def lrs(self) -> dict[str, float]:
        return {"lr/head": self.optimizer.param_groups[-1]["lr"], "lr/backbone": self.optimizer.param_groups[0]["lr"]}


def make_run(start: Start, finetune, group: distributed.Group, seed: int) -> Run:
    """The training run `start` trains with the `finetune` params; the model moves to the device, channels_last.
    The finetune stage, the recipe search, lr-find and bench/finetune.py all build it here."""
    n_classes = len(start.provenance["classes"])
    balance = class_weights(start.train_targets, n_classes)[start.train_targets]
    batches = distributed.GlobalBatches(len(start.train_set), finetune.batch_size, group, seed,
                                        weights=balance if finetune.class_balance == "sampler" else None)
    start.model.to(group.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(start.model, finetune, start.blocks)
    scheduler = make_scheduler(optimizer, finetune, len(batches))
    return Run(start, finetune, group, batches, optimizer, scheduler,
               make_loss(finetune, start.train_targets, n_classes), make_mixing(finetune, n_classes),
               make_ema(start.model, finetune))


def train_one_epoch(run: Run, epoch: int, loader=None) -> float:
    """One pass over the training batches of `epoch` (1-based) with the blocks it trains; the mean
    training loss over all ranks' images. `loader`: `run.loader(epoch)` unless given (a benchmark
    wraps it)."""
    start, finetune, group = run.start, run.finetune, run.group
    model, dev, amp = start.model, group.device, group.device.type == "cuda"
    record = start.provenance["preprocessing"]
    set_trainable(model, start.blocks,
                  trainable_blocks(finetune.unfreeze, finetune.unfreeze_last_n, epoch, len(start.blocks)),
                  finetune.train_bn_stats)
    # DDP registers the parameters that train when it is built, and that set changes with the
    # unfreeze strategy, so it wraps the model afresh each epoch (its weights stay in sync).
    net = model if group.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loader = loader if loader is not None else run.loader(epoch)
    global_sizes = [len(b) for b in run.batches.global_batches()]
    kept = (f"the checkpoint of epoch {epoch - 1} stays in {run.checkpoint_folder}"
            if epoch > 1 and run.checkpoint_folder is not None else "no epoch had finished")
    loss_sum, seen = 0.0, 0
    bar = progress(loader, desc=f"epoch {epoch}/{finetune.epochs}", enabled=group.is_main)
    for step, (images, idx, repeats) in enumerate(bar, start=1):
        images = loader.dataset.augment(images.to(dev, non_blocking=True), idx, repeats)  # tlpipe.ingest.images.TrainImages
        x = normalize_batch(images, record["mean"], record["std"])
        y = start.train_targets[idx].to(dev, non_blocking=True)
        if run.mixing is not None:
            x, y = run.mixing(x, y)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x.contiguous(memory_format=torch.channels_last))
            # Sum over this rank's images / the global batch, x world because DDP averages the
            # ranks' gradients: the step is the global batch's mean gradient for any world size.
            loss = run.loss_fn(logits.float(), y) * (group.world / global_sizes[step - 1])
        if not torch.isfinite(loss):
            raise TlpipeError(f"finetune: loss is {loss.item()} at epoch {epoch} step {step}; "
                              f"{kept}; lower finetune.lr")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update_parameters(model)
        run.step_scheduler()
        loss_sum += loss.item() * global_sizes[step - 1] / group.world
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    loss_sum, seen = distributed.all_sum(group, loss_sum, seen)
    return loss_sum / seen


@torch.inference_mode()
def evaluate(model: nn.Module, batches, targets: torch.Tensor, record: dict,
             group: distributed.Group) -> tuple[float, float]:
    """Val loss and accuracy over (images, manifest ids) batches; each rank scores its share of the
    batches and the sums are combined."""
    model.eval()
    dev, amp = group.device, group.device.type == "cuda"
    loss_sum, correct, count = 0.0, 0, 0
    for images, ids in batches:
        x = normalize_batch(images.to(dev, non_blocking=True), record["mean"], record["std"])
        y = targets[ids].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    loss_sum, correct, count = distributed.all_sum(group, loss_sum, correct, count)
    return loss_sum / count, correct / count


def score_on_val(model: nn.Module, ema, batches, targets: torch.Tensor, record: dict,
                 group: distributed.Group) -> dict[str, float]:
    """val/loss and val/accuracy of the weights, and val_ema/... of their EMA when there is one."""
    scores = dict(zip(("val/loss", "val/accuracy"), evaluate(model, batches, targets, record, group)))
    if ema is not None:
        scores.update(zip(("val_ema/loss", "val_ema/accuracy"), evaluate(ema.module, batches, targets, record, group)))
    return scores


def counts_toward_patience(epoch: int, schedule: str, warmup_epochs: int) -> bool:
    """Whether an epoch without val loss improvement uses up patience.

    Warmup epochs do not: the rising LR moves the model off the probe, and val loss usually rises
    before it falls. Counted, a warmup epoch made `patience` one shorter after it, and whether
    fine-tuning was kept at all hung on the probe's val loss in the fourth decimal.
    """
    return schedule != "cosine" or epoch > warmup_epochs


@dataclass
class Progress:
    """Everything about a run so far except the live weights: the per-epoch records, the kept epoch
    with its weights (`best`), and early stopping.

    `kept_by` "val_loss": with an EMA, each epoch scores both the raw weights (val/...) and the
    average (val_ema/...); the better of the two competes for best, and `best["weights"]` says which
    was kept (probe, raw, ema). `kept_by` "schedule": every epoch replaces the kept weights (the EMA
    when there is one), val is only scored, and the run never stops early.
    """
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # epoch, weights, val_loss, val_accuracy, state
    epoch: int = 0
    stale: int = 0
    stopped: bool = False
    kept_by: str = "val_loss"

    @classmethod
    def from_probe(cls, model: nn.Module, val_loss: float, val_acc: float, kept_by: str = "val_loss") -> "Progress":
        return cls([{"val/loss": val_loss, "val/accuracy": val_acc}],
                   {"epoch": 0, "weights": "probe", "val_loss": val_loss, "val_accuracy": val_acc,
                    "state": copy.deepcopy(model.state_dict())}, kept_by=kept_by)

    def end_epoch(self, epoch: int, record: dict, model: nn.Module, finetune, ema=None) -> None:
        """Record an epoch; keep its weights when val loss improved (or, kept by schedule, always),
        else count it toward patience."""
        self.epoch = epoch
        self.history.append(record)
        options = [("raw", model, record["val/loss"], record["val/accuracy"])]
        if ema is not None:
            options.append(("ema", ema.module, record["val_ema/loss"], record["val_ema/accuracy"]))
        if self.kept_by == "schedule":
            weights, module, val_loss, val_acc = options[-1]
            self.best = {"epoch": epoch, "weights": weights, "val_loss": val_loss, "val_accuracy": val_acc,
                         "state": copy.deepcopy(module.state_dict())}
            return
        weights, module, val_loss, val_acc = min(options, key=lambda o: o[2])
        if val_loss < self.best["val_loss"]:
            self.best = {"epoch": epoch, "weights": weights, "val_loss": val_loss, "val_accuracy": val_acc,
                         "state": copy.deepcopy(module.state_dict())}
            self.stale = 0
        elif counts_toward_patience(epoch, finetune.schedule, finetune.warmup_epochs):
            self.stale += 1
            self.stopped = self.stale >= finetune.patience

    def save(self, checkpoint: checkpoints.EpochCheckpoint, run: Run) -> None:
        checkpoint.save(*self.state(run))

    def state(self, run: Run) -> tuple[dict, dict]:
        """(tensor groups, JSON record): this progress and the run's live state, as a checkpoint holds them."""
        opt_tensors, opt_rest = checkpoints.optimizer_to_flat(run.optimizer.state_dict())
        return ({"model": run.model.state_dict(), "best": self.best["state"], "optimizer": opt_tensors,
                 "rng": {"torch": torch.get_rng_state()},
                 **({"ema": run.ema.state_dict()} if run.ema is not None else {})},
                {"epoch": self.epoch, "stale": self.stale, "stopped": self.stopped, "history": self.history,
                 "kept_by": self.kept_by,
                 "best": {k: v for k, v in self.best.items() if k != "state"},
                 "optimizer": opt_rest, "scheduler": run.scheduler.state_dict()})

    @classmethod
    def resume(cls, checkpoint: checkpoints.EpochCheckpoint, run: Run, kept_by: str = "val_loss") -> "Progress | None":
        """The run's state after its last finished epoch, loaded into its model, optimizer, scheduler,
        EMA and torch's RNG; None when this run has no checkpoint."""
        resumed = checkpoint.load()
        return None if resumed is None else cls.restore(*resumed, run, kept_by)

    @classmethod
    def restore(cls, tensors: dict, record: dict, run: Run, kept_by: str) -> "Progress":
        """`state`'s inverse: load the live state into `run` and torch's RNG; the progress."""
        run.model.load_state_dict(tensors["model"])
        if run.ema is not None:
            run.ema.load_state_dict(tensors["ema"])
        run.optimizer.load_state_dict(checkpoints.optimizer_from_flat(tensors.get("optimizer", {}),
                                                                      record["optimizer"]))
        run.scheduler.load_state_dict(record["scheduler"])
        torch.set_rng_state(tensors["rng"]["torch"])
        # `kept_by` follows from the manifest, which is in the checkpoint's key: the same as the record's
        return cls(record["history"], {**record["best"], "state": tensors["best"]}, record["epoch"],
                   record["stale"], record["stopped"], kept_by)
