"""gpu: features and fine-tuning images/s on a device (CUDA when there is one), each against its
compute limit on the same device.

    python bench/gpu.py [--device auto|cuda|cpu] [--images digits|synthetic|DIR] [--n N]
                        [--img-size 224] [--resize-size 256] [--batch B] [--epochs 2] [--workdir DIR]

One command to run unchanged on a machine with a GPU. With `--device auto` (the default) it uses
CUDA when torch sees a GPU and otherwise says so and measures the CPU: its numbers are then CPU
numbers. `--device cuda` without a GPU is a one-line error.

The images (`--images`): scikit-learn's digits (the default project's images, no download), the
synthetic photo set of bench/synthetic.py, or a folder of class folders; `--n` keeps at most about
n of them (an equal share per class). They become a project made by `tlpipe.tools.scaffold` (source
`folder`, split 70/15/15 per class, the photo geometry by default) with bench/finetune.py's
fine-tuning settings (the default backbone, unfreeze all, AdamW, no RandAugment or mixing); its
data, decode and features stages run on the device (TLPIPE_DEVICE is set for them).

Measured, each tlpipe loop against the compute limit of the same model and batch on the device:

- features: the features stage's hot loop in-process (bench/features.hot_loop: tlpipe.nets.inference
  over the decode stage's shards, every split, the stage's batch size on the device) against the
  backbone's forward on tensors already on the device (bench/reference.forward_throughput). Both
  channels_last, both under bf16 autocast on CUDA. One warm-up pass each; the best of --repeats
  passes counts for both.
- fine-tuning: the finetune stage's training loop (bench/finetune.tlpipe_loop, in its own process)
  against forward + backward + AdamW step on train images already on the device
  (bench/finetune.compute_limit). Median timed epoch after one warm-up epoch, against the best of
  --repeats passes.

The table also says what each loop was seen to run at its model's first convolution (device,
channels_last input, output dtype: bfloat16 under autocast) and whether its batches came in pinned
memory, so a GPU run shows whether the code path did what it should.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import common
import features
import finetune
import reference
import synthetic
from common import BACKBONE, Project, say, table

IMAGE_SETS = ("digits", "synthetic")
SYNTHETIC_N = 1000  # --images synthetic without --n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): cuda when torch sees a GPU, else the CPU (and it says so)")
    p.add_argument("--images", default="digits",
                   help="digits (default: scikit-learn's 1797 scans), synthetic (bench/synthetic.py) or a "
                        "folder of class folders")
    p.add_argument("--n", type=int, help=f"at most about this many images (default all; synthetic {SYNTHETIC_N})")
    p.add_argument("--img-size", type=int, default=224, help="input size, px (default 224)")
    p.add_argument("--resize-size", type=int, default=256, help="evaluation resize, px (default 256)")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    p.add_argument("--batch", type=int, help="fine-tuning batch (default 128 on CUDA, 32 on the CPU); the "
                   "features batch is the stage's (TLPIPE_BATCH_SIZE, default 128 on CUDA, 16 on the CPU)")
    p.add_argument("--epochs", type=int, default=2, help="timed fine-tuning epochs, after one warm-up epoch (default 2)")
    p.add_argument("--limit-images", type=int, help="images on the device for the compute limits "
                   "(default 1024 on CUDA, 128 on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="passes of the limits and the features loop; the "
                   "best counts (default 3)")
    p.add_argument("--workdir", type=Path, help="where the project is built (default: a temporary folder, "
                   "deleted at the end); kept when given")
    return p


def pick_device(name: str):
    """The torch device to measure on; exits with one line when CUDA is asked for and absent."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU found (torch.cuda.is_available() is False); "
              "--device cpu measures the CPU", file=sys.stderr)
        sys.exit(2)
    if name == "auto" and not torch.cuda.is_available():
        print("no CUDA GPU found: measuring on the CPU; every number below is a CPU number, not a GPU number",
              flush=True)
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def image_folder(args, workdir: Path) -> tuple[Path, str]:
    """(a folder of class folders, its name) for --images and --n."""
    from tlpipe.ingest.sources import from_digits

    if args.images == "digits":
        from_digits(workdir / "digits-source")  # the digits source's own PNGs, as class folders
        root, name = workdir / "digits-source" / "digits", "digits"
    elif args.images == "synthetic":
        root = synthetic.generate(args.n or SYNTHETIC_N)
        name = root.name
    else:
        root, name = Path(args.images), Path(args.images).name
        if not root.is_dir():
            sys.exit(f"error: --images {args.images}: not a folder (nor {' or '.join(IMAGE_SETS)})")
    total = sum(len(files) for files in finetune.class_files(root).values())
    if args.n and args.n < total:
        root = finetune.subset_folder(root, workdir / "gpu-images", args.n / total)
    return root, name


def features_rates(project: Project, dev, args) -> dict:
    """The features stage's hot loop and the backbone's forward on the device: images/s of each."""
    from tlpipe.ingest.decoded import DecodedSplit
    from tlpipe.ingest.images import normalize_batch
    from tlpipe.nets import backbones
    from tlpipe.runtime import inference_batch_size

    backbone = backbones.build(BACKBONE)
    mean, std = backbone.mean, backbone.std
    trunk = copy.deepcopy(backbone.trunk)
    seen = common.watch_first_conv(trunk)
    say(f"{project.label}: features hot loop on {dev} (a warm-up pass, then best of {args.repeats}) ...")
    features.hot_loop(project, trunk, mean, std, ("train",), limit=1, dev=dev)  # warm-up: kernels, CUDA context
    n, best = 0, float("inf")
    for _ in range(args.repeats):
        out, seconds = features.hot_loop(project, trunk, mean, std, dev=dev)
        n, best = len(out), min(best, seconds)

    with common.inside(project):
        train = DecodedSplit("train")
        pixels, _ = train.rows(0, min(len(train), args.limit_images))
    inputs = normalize_batch(pixels, mean, std)
    batch = inference_batch_size(dev)
    say(f"{project.label}: features compute limit: forward on {len(inputs)} images on {dev}, batch {batch} ...")
    limit_trunk = copy.deepcopy(backbone.trunk)
    limit_seen = common.watch_first_conv(limit_trunk)
    limit = reference.forward_throughput(limit_trunk, inputs, batch, True, args.repeats, dev, amp=dev.type == "cuda")
    return {"images": n, "batch": batch, "ours": n / best, "limit": limit, "limit_images": len(inputs),
            "observed": seen, "limit_observed": limit_seen}


def seen_row(name: str, seen: dict, pinned: str) -> list:
    """A row of the table of what a loop was seen to run at its model's first convolution."""
    if not seen.get("device"):
        return [name, "not seen (the model has no Conv2d)", "", "", pinned]
    return [name, seen["device"], "channels_last" if seen["channels_last"] else "NCHW", seen["dtype"], pinned]


def pinned_word(flags: list[bool]) -> str:
    return "yes" if flags == [True] else "no" if not any(flags) else "some batches"


def run(workdir: Path, args, dev) -> str:
    """Markdown: the machine, the device and one table, features and fine-tuning."""
    import os

    import torch

    # Every stage and loop process of the project measures on this device.
    os.environ["TLPIPE_DEVICE"] = str(dev)
    batch = args.batch or (128 if dev.type == "cuda" else finetune.BATCH)
    args.warmup_epochs = 1
    args.limit_images = args.limit_images or (1024 if dev.type == "cuda" else 128)
    folder, name = image_folder(args, workdir)
    project = finetune.project_for(folder, workdir, name, args, batch)
    for stage in ("data", "decode", "stats", "features"):
        if project.has_stage(stage) and (stage != "stats" or project.params()["backbone"]["normalize"] == "dataset"):
            project.run(stage)

    feats = features_rates(project, dev, args)
    ours = finetune.measure("tlpipe", project, args)
    limit = finetune.measure("limit", project, args)
    limit_best = max(limit["rates"])

    cuda = dev.type == "cuda"
    precision = "bf16 autocast" if cuda else "fp32"
    machine = common.machine()
    device_name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({machine['CPU']})"
    rows = [
        ["features", f"the features stage's hot loop, in-process (tlpipe.nets.inference over the decode shards, "
         f"all {feats['images']} images, best of {args.repeats} passes)",
         f"forward on {feats['limit_images']} images on the device", str(dev), precision, feats["batch"],
         feats["ours"], feats["limit"], f"{feats['ours'] / feats['limit']:.2f}"],
        ["fine-tuning", f"the finetune stage's training loop ({ours['train_images']} train images, "
         f"DataLoader workers: {ours['workers']}, median of {len(ours['rates'])} timed epochs)",
         f"forward + backward + AdamW step on {limit['images'][0]} train images on the device",
         str(dev), precision, ours["batch"], ours["median"], limit_best, f"{ours['median'] / limit_best:.2f}"],
    ]
    seen = [seen_row("features: tlpipe loop", feats["observed"], "not used (reads the shard files' pages)"),
            seen_row("features: limit", feats["limit_observed"], "n/a"),
            seen_row("fine-tuning: tlpipe loop", ours["observed"], pinned_word(ours["observed"]["pinned"])),
            seen_row("fine-tuning: limit", limit["observed"], "n/a")]
    machine["GPU"] = device_name if cuda else "none found: the numbers are CPU numbers"
    parts = [table(["", ""], [[k, v] for k, v in machine.items()]),
             f"## gpu: {name} ({args.img_size} px, {BACKBONE}) on {device_name}",
             table(["stage", "tlpipe loop", "compute limit", "device", "precision", "batch",
                    "tlpipe images/s", "limit images/s", "ratio"], rows),
             "Both limits: the same model, batch, layout (channels_last) and precision as the loop, on "
             "tensors already on the device; the best of their passes counts. ratio = tlpipe / limit. "
             "Fine-tuning: unfreeze all, AdamW, crops of scale 0.08 to 1 and a flip, BatchNorm statistics "
             "frozen; each fine-tuning loop in its own process.",
             table(["seen at the model's first convolution", "device", "input layout", "output dtype",
                    "batches in pinned memory"], seen),
             "Seen by a forward hook on the first call: bfloat16 output means bf16 autocast was on."]
    if not cuda:
        parts.append("No GPU was used: these are CPU numbers (fp32), not GPU numbers.")
    return "\n\n".join(parts)


def main() -> None:
    args = parser().parse_args()
    dev = pick_device(args.device)
    with common.Workdir(args.workdir) as workdir:
        report = run(workdir, args, dev)
    print()
    print(report)


if __name__ == "__main__":
    main()
