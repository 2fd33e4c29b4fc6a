"""features: run the frozen pretrained backbone once over every image and cache pooled features.

Deterministic: eval mode, no augmentation, fp32, a fixed image order; the same inputs give
bit-identical files on the same device. Device, workers and batch size are resource knobs
(TLPIPE_DEVICE, TLPIPE_WORKERS, TLPIPE_BATCH_SIZE), not params.

With TLPIPE_NPROC / TLPIPE_NNODES (tlpipe.distributed) the batches are dealt out to several
processes round-robin and gathered back in order on rank 0, which alone writes: every image is
computed in the same batch as by one process, so the files are the same.
"""

from pathlib import Path

import torch
import torchvision

from tlpipe import backbones, distributed
from tlpipe.features import FEATURES, save_split
from tlpipe.images import ImageFiles, eval_transform
from tlpipe.io import atomic_dir, read_json, sha256_file, write_json
from tlpipe.manifest import PREPARED, image_paths, read_manifest
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, inference_batch_size, run_stage, workers

STATS = Path("data/stats.json")


def gather_batches(group: distributed.Group, mine: torch.Tensor, batches: list[list[int]]) -> torch.Tensor:
    """All ranks' features in image order on rank 0 (batch k was computed by rank k % world)."""
    if group.world == 1:
        return mine
    everyone = [None] * group.world if group.is_main else None
    torch.distributed.gather_object(mine, everyone, dst=0)
    if not group.is_main:
        return torch.empty(0)
    per_rank = [list(torch.split(t, [len(b) for b in batches[r::group.world]]))
                for r, t in enumerate(everyone)]
    return torch.cat([per_rank[k % group.world][k // group.world] for k in range(len(batches))])


def main() -> None:
    params = load_params("features")
    if distributed.requested() != (1, 1) and not distributed.launched():
        distributed.launch("stages.features")
        return
    group = distributed.join()
    name, normalize = params.backbone.name, params.backbone.normalize
    img_size, resize_size = params.image.img_size, params.image.resize_size
    interpolation = params.image.interpolation

    torch.manual_seed(0)
    backbone = backbones.build(name)
    if normalize == "dataset":
        stats = read_json(STATS)
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    else:
        mean, std = backbone.mean, backbone.std

    manifest, classes = read_manifest()
    dev = group.device
    dataset = ImageFiles(image_paths(manifest), eval_transform(img_size, resize_size, interpolation))
    size = inference_batch_size(dev)
    batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[group.rank::group.world],
                                         num_workers=workers(), pin_memory=dev.type == "cuda")
    mine = backbones.extract_features(backbone.trunk, loader, mean, std, dev, progress=group.is_main)
    features = gather_batches(group, mine, batches)
    distributed.leave(group)
    if not group.is_main:
        return
    if not torch.isfinite(features).all():
        raise TlpipeError(f"backbone {name} produced non-finite features; check the images and weights")

    meta = {
        "backbone": name,
        "weights_file": backbone.weights_file.name,
        "weights_sha256": backbone.weights_sha256,
        "feature_dim": backbone.feature_dim,
        "transform": {"img_size": img_size, "resize_size": resize_size, "interpolation": interpolation},
        "normalize": normalize,
        "mean": list(mean),
        "std": list(std),
        "classes": classes,
        "manifest_sha256": sha256_file(PREPARED / "manifest.csv"),
        "device_type": dev.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    labels = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    with atomic_dir(FEATURES) as out:
        for split in ("train", "val", "test"):
            ids = torch.tensor(manifest.index[manifest["split"] == split].to_numpy(), dtype=torch.int64)
            save_split(out, split, features[ids], labels[ids], ids, meta)
        write_json(out / "meta.json", meta)
    print(f"{len(dataset)} images -> {features.shape[1]}-d features ({name}, {dev.type})")


if __name__ == "__main__":
    run_stage(main)
