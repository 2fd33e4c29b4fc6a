"""finetune: LP-FT. Start from the pretrained backbone plus the trained linear head, then fine-tune.

Starting from the probe's head (not a random one) means epoch 0 already scores the head's val
accuracy and the first gradients do not wreck the pretrained features (Kumar et al. 2022).
Discriminative learning rates: backbone LR = head LR x backbone_lr_mult. The checkpoint with the
best val loss is kept; training stops early after `patience` epochs without improvement.

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

from tlpipe import backbones
from tlpipe.images import ImageFiles, eval_transform, normalize_batch, train_transform
from tlpipe.io import write_json
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.models import Classifier, load_head, save_classifier
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, device, inference_batch_size, progress_enabled, run_stage, workers

HEAD = Path("models/head.safetensors")
HEAD_CONFIG = Path("models/head.json")
MODEL = Path("models/finetuned.safetensors")
MODEL_CONFIG = Path("models/finetuned.json")
CURVES = Path("metrics/finetune_curves")
METRICS = Path("metrics/finetune.json")


def trainable_blocks(strategy: str, last_n: int, epoch: int, total: int) -> int:
    """How many of the backbone's top blocks train in `epoch` (1-based)."""
    if strategy == "all":
        return total
    if strategy == "last_n":
        return min(last_n, total)
    return min(epoch - 1, total)  # gradual: head alone first, then one more block each epoch


def set_trainable(model: Classifier, groups: list[list[torch.nn.Module]], n: int,
                  train_bn_stats: bool) -> None:
    """Train the head and the top `n` blocks; freeze the rest.

    BatchNorm running statistics stay frozen unless train_bn_stats: with small batches, batch
    statistics differ from the pretrained running ones, so the first train-mode forward would not
    be the model the head was fitted on, and the head's large weights turn that into a huge loss.
    """
    model.trunk.eval()
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    for group in groups[len(groups) - n:]:
        for module in group:
            module.train()
            for p in module.parameters():
                p.requires_grad_(True)
    if not train_bn_stats:
        for module in model.trunk.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    model.head.train()


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.inference_mode()
def evaluate(model, loader, targets, mean, std, dev, amp) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for images, idx in loader:
        x = normalize_batch(images.to(dev, non_blocking=True), mean, std)
        y = targets[idx].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(loader.dataset), correct / len(loader.dataset)


def main() -> None:
    params = load_params("finetune")
    f = params.finetune
    seed = params.seed
    epochs, batch_size, patience = f.epochs, f.batch_size, f.patience
    optimizer_name, lr, backbone_lr_mult = f.optimizer, f.lr, f.backbone_lr_mult
    weight_decay, momentum, label_smoothing = f.weight_decay, f.momentum, f.label_smoothing
    schedule, warmup_epochs = f.schedule, f.warmup_epochs
    unfreeze, unfreeze_last_n = f.unfreeze, f.unfreeze_last_n
    crop_scale_min, hflip, randaugment_magnitude = f.crop_scale_min, f.hflip, f.randaugment_magnitude
    train_bn_stats = f.train_bn_stats

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False

    head, head_cfg = load_head(HEAD, HEAD_CONFIG)
    feat = head_cfg["features"]
    backbone = backbones.build(feat["backbone"])
    if backbone.weights_sha256 != feat["weights_sha256"]:
        raise TlpipeError(f"{HEAD_CONFIG}: head was trained on features from other {feat['backbone']} "
                          "weights (sha256 differs); rerun features and head")
    model = Classifier(backbone.trunk, head)
    groups = backbones.blocks(feat["backbone"], model.trunk)

    manifest, classes = read_manifest()
    if classes != head_cfg["classes"]:
        raise TlpipeError(f"{HEAD_CONFIG}: classes differ from data/prepared/classes.json; rerun head")
    geometry = feat["transform"]
    mean, std = feat["mean"], feat["std"]
    targets = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    train_rows = manifest.index[manifest["split"] == "train"].to_numpy().copy()
    val_rows = manifest.index[manifest["split"] == "val"].to_numpy().copy()
    paths = image_paths(manifest)
    train_set = ImageFiles([paths[i] for i in train_rows], train_transform(
        geometry["img_size"], geometry["interpolation"], crop_scale_min, hflip, randaugment_magnitude), seed=seed)
    val_set = ImageFiles([paths[i] for i in val_rows], eval_transform(**geometry))
    train_targets, val_targets = targets[train_rows], targets[val_rows]

    dev = device()
    amp = dev.type == "cuda"  # bf16 autocast on CUDA; fp32 on CPU, where bf16 is slow or absent
    n_workers = workers()
    loader_args = dict(num_workers=n_workers, pin_memory=dev.type == "cuda")
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
        generator=torch.Generator().manual_seed(seed), **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=inference_batch_size(dev),
                                             persistent_workers=n_workers > 0, **loader_args)
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
    steps_per_epoch = len(train_loader)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch))
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1,
                                                               patience=max(1, patience // 2))

    live = Live(str(CURVES), dvcyaml=False, save_dvc_exp=False)
    initial_loss, initial_acc = evaluate(model, val_loader, val_targets, mean, std, dev, amp)
    print(f"epoch 0 (the head on the frozen backbone): val loss {initial_loss:.4f} acc {initial_acc:.4f}")
    live.log_metric("val/loss", initial_loss)
    live.log_metric("val/accuracy", initial_acc)
    best = {"epoch": 0, "val_loss": initial_loss, "val_accuracy": initial_acc,
            "state": copy.deepcopy(model.state_dict())}
    epochs_run, stale = 0, 0
    for epoch in range(1, epochs + 1):
        set_trainable(model, groups, trainable_blocks(unfreeze, unfreeze_last_n, epoch, len(groups)),
                      train_bn_stats)
        train_set.epoch = epoch
        loss_sum, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not progress_enabled())
        for step, (images, idx) in enumerate(bar, start=1):
            x = normalize_batch(images.to(dev, non_blocking=True), mean, std)
            y = train_targets[idx].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise TlpipeError(f"finetune: loss is {loss.item()} at epoch {epoch} step {step}; "
                                  "lower finetune.lr (the best checkpoint so far is not saved)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule == "cosine":
                scheduler.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        val_loss, val_acc = evaluate(model, val_loader, val_targets, mean, std, dev, amp)
        if schedule == "plateau":
            scheduler.step(val_loss)
        epochs_run = epoch
        live.next_step()
        live.log_metric("train/loss", loss_sum / seen)
        live.log_metric("val/loss", val_loss)
        live.log_metric("val/accuracy", val_acc)
        live.log_metric("lr/head", optimizer.param_groups[-1]["lr"])
        live.log_metric("lr/backbone", optimizer.param_groups[0]["lr"])
        print(f"epoch {epoch}: train loss {loss_sum / seen:.4f}  val loss {val_loss:.4f}  val acc {val_acc:.4f}")
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                    "state": copy.deepcopy(model.state_dict())}
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                print(f"early stop: val loss has not improved for {patience} epochs")
                break
    live.end()

    model.load_state_dict(best["state"])
    save_classifier(model, MODEL, MODEL_CONFIG, {
        "backbone": feat["backbone"],
        "weights_sha256_pretrained": feat["weights_sha256"],
        "feature_dim": feat["feature_dim"],
        "classes": classes,
        "transform": geometry,
        "mean": mean,
        "std": std,
        "best_epoch": best["epoch"],
    })
    write_json(METRICS, {
        "initial_val_accuracy": round(initial_acc, 6),
        "initial_val_loss": round(initial_loss, 6),
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "val_loss": round(best["val_loss"], 6),
        "val_accuracy": round(best["val_accuracy"], 6),
    })
    print(f"kept epoch {best['epoch']}: val loss {best['val_loss']:.4f} acc {best['val_accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main)
