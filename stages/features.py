"""features: run the frozen pretrained backbone once over every image and cache pooled features.

Reads the decode stage's uint8 shards (no image decoding here), so the backbone has the CPU to
itself. Deterministic: eval mode, no augmentation, a fixed image order; the same inputs give
bit-identical files on the same device. fp32 on the CPU, bf16 autocast on CUDA (tlpipe.inference).
Device and batch size are resource knobs (TLPIPE_DEVICE, TLPIPE_BATCH_SIZE), not params.

With TLPIPE_NPROC / TLPIPE_NNODES (tlpipe.distributed) each split's batches are dealt out to several
processes round-robin and gathered back in order on rank 0, which alone writes: every image is
computed in the same batch as by one process, so the files are the same.
"""

import time
from pathlib import Path

import torch
import torchvision

from tlpipe import backbones, distributed, inference, preprocessing
from tlpipe.decoded import DecodedSplit, read_meta
from tlpipe.features import save_split
from tlpipe.io import atomic_dir, file_hashes, sha256_file, write_json
from tlpipe.manifest import read_manifest
from tlpipe.moments import read_stats
from tlpipe.params import load_params
from tlpipe.paths import FEATURES, FEATURES_METRICS, MANIFEST, STATS, WEIGHTS
from tlpipe.runtime import TlpipeError, inference_batch_size, run_stage


def gather_batches(group: distributed.Group, mine: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """All ranks' features in image order on rank 0 (batch k, of lengths[k] images, was computed
    by rank k % world)."""
    if group.world == 1:
        return mine
    if not lengths:  # an empty split: every rank knows, so none gathers
        return torch.empty(0)
    everyone = [None] * group.world if group.is_main else None
    torch.distributed.gather_object(mine, everyone, dst=0)
    if not group.is_main:
        return torch.empty(0)
    per_rank = [list(torch.split(t, lengths[r::group.world])) if lengths[r::group.world] else []
                for r, t in enumerate(everyone)]
    return torch.cat([per_rank[k % group.world][k // group.world] for k in range(len(lengths))])


def main() -> None:
    params = load_params("features")
    if distributed.requested() != (1, 1) and not distributed.launched():
        distributed.launch("stages.features")
        return
    group = distributed.join()
    name, normalize, weights = params.backbone.name, params.backbone.normalize, params.backbone.weights
    backbones.entry(name)  # an unknown name fails here, before any work
    check_weights_path(weights, group.is_main)

    torch.manual_seed(0)
    backbone = backbones.build(name, weights=weights)
    if normalize == "dataset":
        mean, std = read_stats(STATS, "backbone.normalize: dataset")
    else:
        mean, std = backbone.mean, backbone.std

    manifest, classes = read_manifest()
    decoded = read_meta()
    warning = backbones.check_input_size(backbone, decoded["preprocessing"]["img_size"])
    if warning and group.is_main:
        print(warning)
    started = time.perf_counter()
    dev = group.device
    size = inference_batch_size(dev)
    features, ids = {}, {}
    for split in ("train", "val", "test"):
        images = DecodedSplit(split, meta=decoded)
        ids[split] = images.ids()
        mine = inference.outputs(backbone.trunk, images.batches(size, group.rank, group.world),
                                 mean, std, dev, desc=f"features {split}", progress=group.is_main)
        features[split] = gather_batches(group, mine, images.batch_lengths(size)).reshape(
            -1, backbone.feature_dim)  # an empty split, or a rank without a batch, gives no chunk
    distributed.leave(group)
    seconds = time.perf_counter() - started
    if not group.is_main:
        return
    if not all(torch.isfinite(f).all() for f in features.values()):
        raise TlpipeError(f"backbone {name} produced non-finite features; check the images and weights")

    meta = {
        "backbone": name,
        "weights_source": backbone.weights_source,
        "weights_file": backbone.weights_file,
        "weights_sha256": backbone.weights_sha256,
        "feature_dim": backbone.feature_dim,
        "classes": classes,
        "preprocessing": preprocessing.record(decoded["preprocessing"], normalize, mean, std),
        "manifest_sha256": sha256_file(MANIFEST),
        "device_type": dev.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    labels = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    with atomic_dir(FEATURES) as out:
        for split in ("train", "val", "test"):
            save_split(out, split, features[split], labels[ids[split]], ids[split], meta)
        # Consumers check these before use (tlpipe.features.load_split).
        write_json(out / "meta.json", {**meta, "files": file_hashes(out, [f"{s}.safetensors" for s in features])})
    # Timing is not a result: it lives in a git-tracked metrics file, so the cached features stay
    # bit-identical from run to run.
    write_json(FEATURES_METRICS, {"backbone": name, "images": len(manifest), "seconds": round(seconds, 3),
                                  "ms_per_image": round(1000 * seconds / max(len(manifest), 1), 3),
                                  "device": dev.type, "processes": group.world})
    print(f"{len(manifest)} images -> {backbone.feature_dim}-d features ({name}, weights from "
          f"{backbone.weights_source}: {backbone.weights_file}, {dev.type}, {1000 * seconds / max(len(manifest), 1):.1f} ms/image)")


def check_weights_path(weights: str, say: bool) -> None:
    """A weights file inside the project must be under weights/ (the folder dvc.yaml declares), so
    that changing it reruns features; one outside is only checked by its recorded sha256."""
    if not weights:
        return
    path = Path(weights).expanduser().resolve()
    root = Path.cwd().resolve()
    if path.is_relative_to(root) and not path.is_relative_to(root / WEIGHTS):
        raise TlpipeError(f"backbone.weights: {weights} is inside the project but not under {WEIGHTS}/, "
                          f"the folder dvc.yaml declares as a dependency of features; move it there")
    if not path.is_relative_to(root) and say:
        print(f"note: backbone.weights {weights} is outside the project: DVC does not watch it; its sha256 "
              "is recorded and checked downstream (after changing it: dvc repro -f features)")


if __name__ == "__main__":
    run_stage(main)
