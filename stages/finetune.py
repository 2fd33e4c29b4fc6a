"""finetune: LP-FT. Fit a linear probe on the cached features, put it on the pretrained backbone,
then fine-tune the whole model.

Starting from a probe (not a random head) means epoch 0 already scores the probe's val accuracy and
the first gradients do not wreck the pretrained features (Kumar et al. 2022). The probe is fitted
here, from the cached features at `finetune.probe_l2`, rather than read from the head stage: it
takes a second, and it keeps fine-tuning independent of the head's params, so sweeping the head
never re-runs the expensive stage. With `probe_l2` equal to the head's chosen L2 the two are the
same classifier.

Discriminative learning rates: backbone LR = head LR x backbone_lr_mult. The checkpoint with the
best val loss is kept; training stops early after `patience` epochs without improvement (warmup
epochs not counted). After every epoch the whole training state goes to models/.resume/
(tlpipe.checkpoints), so a killed run continues from its last finished epoch, with the result of
an uninterrupted one.

Several processes (GPUs or nodes): TLPIPE_NPROC / TLPIPE_NNODES relaunch this module under
torchrun (tlpipe.distributed), as DistributedDataParallel. `batch_size` stays the global batch and
each optimizer step sees the same images however many processes share it; rank 0 alone writes.

Outputs: models/finetuned.safetensors + models/finetuned.json (rebuildable without pickle),
dvclive curves in metrics/finetune_curves/, a summary in metrics/finetune.json.
"""

import copy
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from tlpipe import backbones, checkpoints, distributed, linear
from tlpipe.features import load_split
from tlpipe.decoded import DecodedSplit
from tlpipe.images import ImageFiles, normalize_batch, train_transform
from tlpipe.io import sha256_file, write_json, writing
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.models import Classifier, linear_from, save_classifier, set_trainable, trainable_blocks
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, inference_batch_size, progress_enabled, run_stage, workers

MODEL = Path("models/finetuned.safetensors")
MODEL_CONFIG = Path("models/finetuned.json")
CURVES = Path("metrics/finetune_curves")
METRICS = Path("metrics/finetune.json")


def counts_toward_patience(epoch: int, schedule: str, warmup_epochs: int) -> bool:
    """Whether an epoch without val loss improvement uses up patience.

    Warmup epochs do not: the rising LR moves the model off the probe, and val loss usually rises
    before it falls. Counted, a warmup epoch made `patience` one shorter after it, and whether
    fine-tuning was kept at all hung on the probe's val loss in the fourth decimal.
    """
    return schedule != "cosine" or epoch > warmup_epochs


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.inference_mode()
def evaluate(model, batches, targets, mean, std, group, amp) -> tuple[float, float]:
    """Val loss and accuracy over (images, manifest ids) batches; each rank scores its share of the
    batches and the sums are combined."""
    model.eval()
    dev = group.device
    loss_sum, correct, count = 0.0, 0, 0
    for images, ids in batches:
        x = normalize_batch(images.to(dev, non_blocking=True), mean, std)
        y = targets[ids].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    loss_sum, correct, count = distributed.all_sum(group, loss_sum, correct, count)
    return loss_sum / count, correct / count


def main() -> None:
    params = load_params("finetune")
    if distributed.requested() != (1, 1) and not distributed.launched():
        distributed.launch("stages.finetune")
        return
    group = distributed.join()
    f = params.finetune
    seed = params.seed
    epochs, batch_size, patience = f.epochs, f.batch_size, f.patience
    optimizer_name, lr, backbone_lr_mult = f.optimizer, f.lr, f.backbone_lr_mult
    weight_decay, momentum, label_smoothing = f.weight_decay, f.momentum, f.label_smoothing
    schedule, warmup_epochs = f.schedule, f.warmup_epochs
    unfreeze, unfreeze_last_n = f.unfreeze, f.unfreeze_last_n
    crop_scale_min, hflip, randaugment_magnitude = f.crop_scale_min, f.hflip, f.randaugment_magnitude
    train_bn_stats, probe_l2 = f.train_bn_stats, f.probe_l2
    if train_bn_stats and batch_size < 2 * group.world:
        raise TlpipeError(f"finetune.train_bn_stats needs at least 2 images per process and batch: "
                          f"finetune.batch_size ({batch_size}) < 2 x {group.world} processes")
    if batch_size < group.world:
        raise TlpipeError(f"finetune.batch_size ({batch_size}) is the global batch: it must be at least "
                          f"the number of processes ({group.world})")
    settings = {"seed": seed, "finetune": f.dump()}

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False

    # LP: the probe on the cached features, the same fit the head stage makes at one L2 point.
    train_features, meta = load_split("train")
    classes = meta["classes"]
    weight, bias = linear.fit_probe(train_features["features"], train_features["labels"], len(classes),
                                    probe_l2)
    backbone = backbones.build(meta["backbone"])
    if backbone.weights_sha256 != meta["weights_sha256"]:
        raise TlpipeError(f"data/features/meta.json: features come from other {meta['backbone']} "
                          "weights (sha256 differs); rerun the features stage")
    model = Classifier(backbone.trunk, linear_from(weight.float(), bias.float()))
    groups = backbones.blocks(meta["backbone"], model.trunk)

    manifest, manifest_classes = read_manifest()
    if manifest_classes != classes:
        raise TlpipeError("data/features/meta.json: classes differ from data/prepared/classes.json; "
                          "rerun the features stage")
    geometry = meta["transform"]
    mean, std = meta["mean"], meta["std"]
    targets = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    train_rows = manifest.index[manifest["split"] == "train"].to_numpy().copy()
    paths = image_paths(manifest)
    train_set = ImageFiles([paths[i] for i in train_rows], train_transform(
        geometry["img_size"], geometry["interpolation"], crop_scale_min, hflip, randaugment_magnitude), seed=seed)
    val = DecodedSplit("val")
    if val.geometry != geometry:
        raise TlpipeError(f"data/decoded holds geometry {val.geometry}, the features {geometry}; "
                          "rerun the features stage")
    train_targets = targets[train_rows]

    dev = group.device
    amp = dev.type == "cuda"  # bf16 autocast on CUDA; fp32 on CPU, where bf16 is slow or absent
    n_workers = workers()
    loader_args = dict(num_workers=n_workers, pin_memory=dev.type == "cuda")
    val_batches = val.batches(inference_batch_size(dev), group.rank, group.world)
    batches = distributed.GlobalBatches(len(train_set), batch_size, group, seed)
    steps_per_epoch = len(batches)
    model.to(dev, memory_format=torch.channels_last)

    def param_groups(module, group_lr):
        decay = [p for p in module.parameters() if p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.ndim <= 1]  # biases and norms
        return [{"params": decay, "lr": group_lr, "weight_decay": weight_decay},
                {"params": no_decay, "lr": group_lr, "weight_decay": 0.0}]
    groups_cfg = param_groups(model.trunk, lr * backbone_lr_mult) + param_groups(model.head, lr)
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(groups_cfg)
    else:
        optimizer = torch.optim.SGD(groups_cfg, momentum=momentum, nesterov=momentum > 0)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch))
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1,
                                                               patience=max(1, patience // 2))

    # Resume only a run with exactly these inputs, code and device (its results would differ else).
    code = [Path("stages/finetune.py"), *sorted(Path("tlpipe").glob("*.py"))]
    checkpoint = checkpoints.EpochCheckpoint(checkpoints.run_key({
        "params": settings, "device": dev.type,
        "inputs": {str(p): sha256_file(p) for p in [*code, Path("data/prepared/manifest.csv"),
                                                    Path("data/decoded/meta.json"),
                                                    Path("data/features/train.safetensors")]},
    }))
    main_rank = group.is_main
    if main_rank:
        checkpoint.remove_others()
    with writing(CURVES):
        live = Live(str(CURVES), dvcyaml=False, save_dvc_exp=False) if main_rank else None
    history: list[dict] = []

    def log(record: dict) -> None:
        if live is not None:
            with writing(CURVES):
                if history:
                    live.next_step()
                for name, value in record.items():
                    live.log_metric(name, value)
        history.append(record)

    def say(text: str) -> None:
        if main_rank:
            print(text)

    resumed = checkpoint.load()
    if resumed is None:
        initial_loss, initial_acc = evaluate(model, val_batches, targets, mean, std, group, amp)
        say(f"epoch 0 (the probe on the frozen backbone): val loss {initial_loss:.4f} acc {initial_acc:.4f}")
        log({"val/loss": initial_loss, "val/accuracy": initial_acc})
        best = {"epoch": 0, "val_loss": initial_loss, "val_accuracy": initial_acc,
                "state": copy.deepcopy(model.state_dict())}
        start, stale, stopped = 1, 0, False
    else:
        tensors, record = resumed
        model.load_state_dict(tensors["model"])
        optimizer.load_state_dict(checkpoints.optimizer_from_flat(tensors.get("optimizer", {}),
                                                                  record["optimizer"]))
        scheduler.load_state_dict(record["scheduler"])
        torch.set_rng_state(tensors["rng"]["torch"])
        for entry in record["history"]:
            log(entry)
        best = {**record["best"], "state": tensors["best"]}
        start, stale, stopped = record["epoch"] + 1, record["stale"], record["stopped"]
        say(f"resuming after epoch {record['epoch']} from {checkpoint.folder}")
    initial_loss, initial_acc = history[0]["val/loss"], history[0]["val/accuracy"]

    for epoch in range(start, epochs + 1):
        if stopped:
            break
        set_trainable(model, groups, trainable_blocks(unfreeze, unfreeze_last_n, epoch, len(groups)),
                      train_bn_stats)
        # DDP registers the parameters that train when it is built, and that set changes with the
        # unfreeze strategy, so it wraps the model afresh each epoch (its weights stay in sync).
        net = model if group.world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
        train_set.epoch = batches.epoch = epoch
        global_sizes = [len(b) for b in batches.global_batches()]
        train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, **loader_args)
        loss_sum, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not (progress_enabled() and main_rank))
        for step, (images, idx) in enumerate(bar, start=1):
            x = normalize_batch(images.to(dev, non_blocking=True), mean, std)
            y = train_targets[idx].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x.contiguous(memory_format=torch.channels_last))
                # Sum over this rank's images / the global batch, x world because DDP averages the
                # ranks' gradients: the step is the global batch's mean gradient for any world size.
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing,
                                       reduction="sum") * (group.world / global_sizes[step - 1])
            if not torch.isfinite(loss):
                kept = (f"the checkpoint of epoch {epoch - 1} stays in {checkpoint.folder}"
                        if epoch > 1 else "no epoch had finished")
                raise TlpipeError(f"finetune: loss is {loss.item()} at epoch {epoch} step {step}; "
                                  f"{kept}; lower finetune.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule == "cosine":
                scheduler.step()
            loss_sum += loss.item() * global_sizes[step - 1] / group.world
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        loss_sum, seen = distributed.all_sum(group, loss_sum, seen)
        val_loss, val_acc = evaluate(model, val_batches, targets, mean, std, group, amp)
        if schedule == "plateau":
            scheduler.step(val_loss)
        log({"train/loss": loss_sum / seen, "val/loss": val_loss, "val/accuracy": val_acc,
             "lr/head": optimizer.param_groups[-1]["lr"], "lr/backbone": optimizer.param_groups[0]["lr"]})
        say(f"epoch {epoch}: train loss {loss_sum / seen:.4f}  val loss {val_loss:.4f}  val acc {val_acc:.4f}")
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                    "state": copy.deepcopy(model.state_dict())}
            stale = 0
        elif counts_toward_patience(epoch, schedule, warmup_epochs):
            stale += 1
            if stale >= patience:
                say(f"early stop: val loss has not improved for {patience} epochs")
                stopped = True
        if main_rank:
            opt_tensors, opt_rest = checkpoints.optimizer_to_flat(optimizer.state_dict())
            checkpoint.save(
                {"model": model.state_dict(), "best": best["state"], "optimizer": opt_tensors,
                 "rng": {"torch": torch.get_rng_state()}},
                {"epoch": epoch, "stale": stale, "stopped": stopped, "history": history,
                 "best": {k: v for k, v in best.items() if k != "state"},
                 "optimizer": opt_rest, "scheduler": scheduler.state_dict()})
        if stopped:
            break
    distributed.barrier(group)  # every rank finished cleanly before anything is written
    if not main_rank:
        distributed.leave(group)
        return
    with writing(CURVES):
        live.end()

    model.load_state_dict(best["state"])
    save_classifier(model, MODEL, MODEL_CONFIG, {
        "backbone": meta["backbone"],
        "weights_sha256_pretrained": meta["weights_sha256"],
        "feature_dim": meta["feature_dim"],
        "classes": classes,
        "transform": geometry,
        "normalize": meta["normalize"],
        "mean": mean,
        "std": std,
        "probe_l2": probe_l2,
        "best_epoch": best["epoch"],
        "resume_key": checkpoint.folder.name,  # its checkpoint is stale once these outputs exist
    })
    write_json(METRICS, {
        "initial_val_accuracy": round(initial_acc, 6),
        "initial_val_loss": round(initial_loss, 6),
        "best_epoch": best["epoch"],
        "epochs_run": len(history) - 1,
        "val_loss": round(best["val_loss"], 6),
        "val_accuracy": round(best["val_accuracy"], 6),
    })
    checkpoint.remove()
    distributed.leave(group)
    print(f"kept epoch {best['epoch']}: val loss {best['val_loss']:.4f} acc {best['val_accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main)
