"""finetune: fine-tuning's training throughput, tlpipe's loop against the plain tutorial loop and
against the compute limit, and tlpipe's peak RSS at n/5 and n training images.

    python bench/finetune.py [--quick] [--data DIR] [--img-size 224] [--resize-size 256]
                             [--epochs 3] [--max-images N] [--workdir DIR]

Targets (DESIGN.md §9, on 2 cores): tlpipe's loop >= 1.5x the images/s of the plain loop and
>= 0.8x the compute limit; its peak RSS flat in the number of training images. One model for all
three: the default backbone (tf_efficientnet_lite0, its pretrained weights) + a linear head, every
layer trained (unfreeze all), AdamW with the project's LRs (backbone = lr x backbone_lr_mult),
label-smoothed cross-entropy, batch 32, fp32 on the CPU.

The images: a class-folder dataset (default hymenoptera's train/; sign-digits' images/ works too),
made into a project by `tlpipe.tools.scaffold` (source `folder`, split 70/15/15 per class) whose data,
decode and features stages run first (stats too when backbone.normalize is `dataset`). All three
loops train on its train split. Each loop runs in its own process (`--measure`, a fresh
interpreter, watched with psutil for peak RSS):

- tlpipe: the finetune stage's training loop, in-process as stages/finetune.py runs it
  (tlpipe.train.finetuning.begin, make_run: the stage's batches, optimizer, scheduler and loss; the
  run's DataLoader with the stage's workers; train_one_epoch(run, epoch)), without the stage's val pass and checkpoint after each epoch.
- plain: torchvision ImageFolder (symlinks to the same train images) + RandomResizedCrop + flip +
  ToTensor + Normalize, DataLoader(batch_size=32, num_workers=2, shuffle=True), model.train(),
  NCHW, a fresh linear head, AdamW over two groups (backbone, head) at the same LRs.
- limit: forward, backward and AdamW step on batches already in memory (the decode stage's
  train images, normalized, channels_last), the same model, optimizer and loss as tlpipe's loop.

Timing: the loops run one untimed warm-up epoch, then --epochs timed epochs, each from building
its DataLoader (worker start-up included, as the stage pays it) to its last step; the median epoch
counts. The limit runs 2 untimed warm-up steps, then --repeats passes over its batches; the best
pass counts (as bench/features.py: a limit is the best the machine does).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import common
from common import BACKBONE, Project, Section, Target, mib, say, table

SPEEDUP = 1.5
OF_LIMIT = 0.8
# Peak RSS "flat in n", as bench/memory.py judges it: growth from n/5 to n at most max(64 MiB, 10 %).
SLACK_BYTES = 64 << 20
SLACK_FRACTION = 0.10
BATCH = 32
HYMENOPTERA_TRAIN = common.HYMENOPTERA / "train"
SIGN_DIGITS = common.HYMENOPTERA.parent / "sign-digits" / "images"
RESULT = "RESULT "  # the line a --measure process prints its numbers on


# ---------------------------------------------------------------- the measured loops (--measure)


def tlpipe_loop(args) -> dict:
    """The finetune stage's training loop, set up as stages/finetune.py does (run in the project)."""
    from tlpipe.params import load_params
    from tlpipe.runtime import training_workers
    from tlpipe.train import distributed, finetuning

    params = load_params("finetune")
    group, finetune, seed = distributed.join(), params.finetune, params.seed
    finetuning.check_batch_size(finetune, group.world)
    start = finetuning.begin(finetune, seed)
    run = finetuning.make_run(start, finetune, group, seed)
    dev = group.device
    seen = common.watch_first_conv(start.model)

    seconds, images, pinned = [], [], set()
    for epoch in range(1, args.warmup_epochs + args.epochs + 1):
        began = time.perf_counter()
        loader = common.WatchedLoader(run.loader(epoch))
        finetuning.train_one_epoch(run, epoch, loader)
        common.synchronize(dev)
        seconds.append(time.perf_counter() - began)
        images.append(sum(len(b) for b in run.batches.global_batches()))
        pinned |= loader.pinned
    return {"train_images": len(start.train_set), "images": images[args.warmup_epochs:],
            "seconds": seconds[args.warmup_epochs:], "workers": training_workers(dev), "batch": finetune.batch_size,
            "observed": {**seen, "pinned": sorted(pinned)}}


def plain_loop(args) -> dict:
    """The tutorial's fine-tuning loop over an ImageFolder of the project's train images."""
    import torch
    import yaml
    from torch import nn
    from torchvision import datasets, transforms

    from tlpipe.nets import backbones

    params = yaml.safe_load(Path("params.yaml").read_text())
    image, finetune = params["image"], params["finetune"]
    torch.manual_seed(params["seed"])
    backbone = backbones.build(BACKBONE)
    mode = {"bicubic": transforms.InterpolationMode.BICUBIC,
            "bilinear": transforms.InterpolationMode.BILINEAR}[image["interpolation"]]
    dataset = datasets.ImageFolder(str(args.tree), transform=transforms.Compose([
        transforms.RandomResizedCrop(image["img_size"], interpolation=mode),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=finetune["batch_size"], num_workers=2, shuffle=True)
    model = nn.Sequential(backbone.trunk, nn.Linear(backbone.feature_dim, len(dataset.classes)))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(),
                                    "lr": finetune["lr"] * finetune["backbone_lr_mult"]},
                                   {"params": model[1].parameters(), "lr": finetune["lr"]}],
                                  weight_decay=finetune["weight_decay"])
    criterion = nn.CrossEntropyLoss(label_smoothing=finetune["label_smoothing"])

    seconds, images = [], []
    for _ in range(args.warmup_epochs + args.epochs):
        began, seen = time.perf_counter(), 0
        model.train()
        for x, y in loader:  # iterating the loader starts its workers: timed, as in the tlpipe loop
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        seconds.append(time.perf_counter() - began)
        images.append(seen)
    return {"train_images": len(dataset), "images": images[args.warmup_epochs:],
            "seconds": seconds[args.warmup_epochs:], "workers": 2}


def compute_limit(args) -> dict:
    """Forward + backward + step of tlpipe's model, optimizer and loss on train images already on the
    device (TLPIPE_DEVICE), channels_last; under bf16 autocast on CUDA, as train_one_epoch."""
    import torch

    from tlpipe.ingest.decoded import DecodedSplit
    from tlpipe.ingest.images import normalize_batch
    from tlpipe.params import load_params
    from tlpipe.runtime import device
    from tlpipe.train import distributed, finetuning

    params = load_params("finetune")
    finetune, seed, dev = params.finetune, params.seed, device()
    amp = dev.type == "cuda"
    start = finetuning.begin(finetune, seed)
    run = finetuning.make_run(start, finetune, distributed.Group(0, 1, dev), seed)
    model, record, optimizer, loss_fn = start.model, start.provenance["preprocessing"], run.optimizer, run.loss_fn
    seen = common.watch_first_conv(model)
    finetuning.set_trainable(model, start.blocks, len(start.blocks), finetune.train_bn_stats)

    train = DecodedSplit("train")
    n = min(len(train), args.limit_images)
    n = max(min(n, finetune.batch_size), n - n % finetune.batch_size)  # whole batches, or one short one
    pixels, ids = train.rows(0, n)
    x = normalize_batch(pixels.to(dev), record["mean"], record["std"]).contiguous(memory_format=torch.channels_last)
    y = start.targets[ids].to(dev)
    batches = [(x[i:i + finetune.batch_size], y[i:i + finetune.batch_size]) for i in range(0, n, finetune.batch_size)]

    def step(xb, yb) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(xb).float(), yb) / len(yb)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: oneDNN or cuDNN picks its kernels, AdamW allocates its state
        step(*batches[0])
    seconds = []
    for _ in range(args.repeats):
        common.synchronize(dev)
        began = time.perf_counter()
        for xb, yb in batches:
            step(xb, yb)
        common.synchronize(dev)
        seconds.append(time.perf_counter() - began)
    return {"train_images": len(train), "images": [n] * len(seconds), "seconds": seconds, "workers": 0,
            "batch": finetune.batch_size, "observed": seen}


LOOPS = {"tlpipe": tlpipe_loop, "plain": plain_loop, "limit": compute_limit}


# ---------------------------------------------------------------- the benchmark


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HYMENOPTERA_TRAIN,
                   help=f"a folder of class folders (default {HYMENOPTERA_TRAIN}; also {SIGN_DIGITS})")
    p.add_argument("--img-size", type=int, default=224, help="training crop, px (default 224)")
    p.add_argument("--resize-size", type=int, default=256,
                   help="the evaluation resize before the centre crop, px (default 256)")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic",
                   help="the project's image.interpolation; the plain loop's crop uses the same (default bicubic)")
    p.add_argument("--epochs", type=int, help="timed epochs per loop, after one warm-up epoch (default 3; --quick 1)")
    p.add_argument("--max-images", type=int, help="use at most this many images of --data, an equal share "
                   "per class (default all; --quick 60)")
    p.add_argument("--limit-images", type=int, help="train images in memory for the compute limit "
                   "(default 128; --quick 64)")
    p.add_argument("--repeats", type=int, help="passes over them, the best counts (default 3; --quick 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images, 1 timed epoch")
    p.add_argument("--workdir", type=Path, help="where projects are built (default: a temporary folder, "
                   "deleted at the end); kept when given")
    p.add_argument("--measure", choices=sorted(LOOPS), help=argparse.SUPPRESS)  # one loop, in this process
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup-epochs", type=int, default=1, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    quick = args.quick
    args.epochs = args.epochs or (1 if quick else 3)
    args.max_images = args.max_images or (60 if quick else None)
    args.limit_images = args.limit_images or (64 if quick else 128)
    args.repeats = args.repeats or (2 if quick else 3)
    return args


def class_files(root: Path) -> dict[str, list[Path]]:
    from tlpipe.ingest.images import list_files

    classes = {d.name: list_files(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if len(classes) < 2:
        sys.exit(f"--data {root}: needs at least two class folders")
    return classes


def subset_folder(root: Path, dest: Path, fraction: float, minimum: int = 3) -> Path:
    """A copy of the first `fraction` of each class's files (at least `minimum`: train + val + test).
    A copy, not links: the data stage refuses symlinks that lead out of its root."""
    shutil.rmtree(dest, ignore_errors=True)
    for name, files in class_files(root).items():
        keep = files[:max(minimum, math.ceil(fraction * len(files)))]
        (dest / name).mkdir(parents=True)
        for path in keep:
            shutil.copy2(path, dest / name / path.name)
    return dest


def measure(kind: str, project: Project, args, tree: Path | None = None) -> dict:
    """Run one loop in its own process in the project; its numbers, wall time and peak RSS."""
    say(f"{project.label}: {kind} loop ...")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, "--epochs", str(args.epochs),
           "--limit-images", str(args.limit_images), "--repeats", str(args.repeats),
           "--warmup-epochs", str(args.warmup_epochs)] + (["--tree", str(tree)] if tree else [])
    wall, peak, out, err, code = common.run_monitored(cmd, project.path)
    if code:
        sys.exit(f"the {kind} loop failed in {project.path} (exit {code}):\n{out[-3000:]}\n{err[-3000:]}")
    result = json.loads(next(line[len(RESULT):] for line in out.splitlines() if line.startswith(RESULT)))
    rates = [i / s for i, s in zip(result["images"], result["seconds"])]
    result.update(wall=wall, peak_rss=peak, rates=rates, median=statistics.median(rates))
    say(f"{project.label}: {kind}: {result['median']:.2f} images/s (median of {len(rates)}), "
        f"peak RSS {mib(peak)}")
    return result


def project_for(folder: Path, workdir: Path, label: str, args, batch: int = BATCH) -> Project:
    return Project.create(workdir / f"finetune-{label}", label, {
        "data.source": "folder", "data.root": str(folder.resolve()),
        "image.img_size": args.img_size, "image.resize_size": args.resize_size,
        "image.interpolation": args.interpolation,
        # The model, optimizer and batch the issue names, and the plain loop's augmentation
        # (RandomResizedCrop's default scale range, a flip; no RandAugment or mixing).
        "finetune.unfreeze": "all", "finetune.optimizer": "adamw", "finetune.batch_size": batch,
        "finetune.epochs": args.warmup_epochs + args.epochs, "finetune.crop_scale_min": 0.08,
        "finetune.hflip": True, "finetune.randaugment_magnitude": 0, "finetune.mixup_alpha": 0.0,
        "finetune.cutmix_alpha": 0.0, "finetune.ema_decay": 0.0, "finetune.class_balance": "none"})


def memory_target(n_small: int, small_rss: int, n: int, large_rss: int) -> Target:
    """Peak RSS flat in n: growth from n_small to n train images at most max(64 MiB, 10 %). Judged
    only when the small run fills a batch: below that its batches are smaller, and the activations
    of a batch (gigabytes at 224 px) follow the batch, not n."""
    allowed = max(SLACK_BYTES, SLACK_FRACTION * small_rss)
    judged = n_small >= BATCH
    return Target(f"finetune peak RSS ({n_small} vs {n} train images)", f"growth <= {mib(allowed)}",
                  f"{mib(small_rss)} -> {mib(large_rss)}", large_rss - small_rss <= allowed if judged else None,
                  "tlpipe's training loop" if judged else
                  f"not judged: n/5 is below one batch of {BATCH}, so the batches differ, not only n")


def run(workdir: Path, args) -> Section:
    if not args.data.is_dir():
        sys.exit(f"--data: not a folder: {args.data}")
    data = args.data
    if args.max_images:
        total = sum(len(files) for files in class_files(data).values())
        if args.max_images < total:
            data = subset_folder(data, workdir / "finetune-images-max", args.max_images / total)
    name = args.data.resolve().parent.name if args.data.name in ("train", "images") else args.data.name
    large = project_for(data, workdir, name, args)
    small = project_for(subset_folder(data, workdir / "finetune-images-fifth", 0.2), workdir, f"{name}-fifth", args)
    for p in (large, small):
        # The fine-tuning inputs: data, decode and features (stats only when features normalize by it).
        for stage in ("data", "decode", "stats", "features"):
            if p.has_stage(stage) and (stage != "stats" or p.params()["backbone"]["normalize"] == "dataset"):
                p.run(stage)
    tree = common.image_folder_tree(large, workdir / f"finetune-{name}-train-tree", ("train",))

    ours = measure("tlpipe", large, args)
    ours_small = measure("tlpipe", small, args)
    plain = measure("plain", large, args, tree)
    limit = measure("limit", large, args)
    limit["best"] = max(limit["rates"])
    n, n_small = ours["train_images"], ours_small["train_images"]

    def spread(r: dict) -> str:
        return f"{min(r['rates']):.2f} - {max(r['rates']):.2f}"

    rows = [
        ["tlpipe: the finetune stage's training loop, in-process (tlpipe.finetuning, as stages/finetune.py; "
         f"DataLoader workers {ours['workers']}, channels_last)", n, f"{len(ours['rates'])} epochs",
         ours["median"], spread(ours), mib(ours["peak_rss"])],
        ["tlpipe: the same, on a fifth of the images (memory)", n_small, f"{len(ours_small['rates'])} epochs",
         ours_small["median"], spread(ours_small), mib(ours_small["peak_rss"])],
        ["plain: ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, DataLoader(32, "
         "num_workers=2, shuffle), NCHW, model.train()", plain["train_images"], f"{len(plain['rates'])} epochs",
         plain["median"], spread(plain), mib(plain["peak_rss"])],
        [f"compute limit: forward + backward + AdamW step on {limit['images'][0]} train images in memory, "
         "channels_last", limit["images"][0], f"best of {len(limit['rates'])} passes", limit["best"],
         spread(limit), mib(limit["peak_rss"])],
    ]
    section = Section(f"finetune: {name} ({n} train images, {args.img_size} px crops, {BACKBONE}, "
                      f"unfreeze all, AdamW, batch {BATCH})")
    section.parts.append(table(["loop", "train images", "timed", "images/s", "range (images/s)", "peak RSS"],
                               rows))
    section.parts.append(
        "Each loop ran in its own process. Loops: one untimed warm-up epoch, then each epoch timed from "
        "building its DataLoader (worker start-up included) to its last optimizer step; images/s is the "
        "median epoch. tlpipe's loop skips the stage's val pass and checkpoint after each epoch. The "
        "plain loop trains BatchNorm statistics (model.train(), as tutorials do); tlpipe's loop and the "
        f"limit keep them frozen (finetune.train_bn_stats: false). Crops: scale (0.08, 1), "
        f"{args.interpolation} on both. Peak RSS: the summed RSS of the process tree (DataLoader workers "
        "included), polled every 20 ms, over the whole process (model building included).")

    section.targets += [
        Target(f"finetune vs plain loop ({name})", f">= {SPEEDUP:g}x images/s",
               f"{ours['median'] / plain['median']:.2f}x ({ours['median']:.2f} vs {plain['median']:.2f} img/s)",
               ours["median"] >= SPEEDUP * plain["median"], "tlpipe's training loop, in-process"),
        Target(f"finetune vs compute limit ({name})", f">= {OF_LIMIT:g}x",
               f"{ours['median'] / limit['best']:.2f}x ({ours['median']:.2f} vs {limit['best']:.2f} img/s)",
               ours["median"] >= OF_LIMIT * limit["best"], "forward + backward + step on tensors in memory"),
        memory_target(n_small, ours_small["peak_rss"], n, ours["peak_rss"]),
    ]
    return section


def main() -> None:
    args = parse()
    if args.measure:
        result = LOOPS[args.measure](args)
        print(RESULT + json.dumps(result), flush=True)
        return
    print(table(["", ""], [[k, v] for k, v in common.machine().items()]))
    with common.Workdir(args.workdir) as workdir:
        section = run(workdir, args)
    print()
    print(section.markdown())
    print(common.targets_table(section.targets))


if __name__ == "__main__":
    main()
