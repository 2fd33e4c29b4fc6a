"""features: run the frozen pretrained backbone once over every image and cache pooled features.

Reads the decode stage's uint8 shards (no image decoding here), so the backbone has the CPU to
itself. Deterministic: eval mode, no augmentation, a fixed image order; the same inputs give
bit-identical files on the same device. fp32 on the CPU, bf16 autocast on CUDA (tlpipe.nets.inference).
Device and batch size are resource knobs (TLPIPE_DEVICE, TLPIPE_BATCH_SIZE), not params.

The same forward pass also yields each stage's output pooled to 1x1 and 2x2 (tlpipe.nets.layers), kept
in `layers-{split}.safetensors` for a head that reads intermediate layers (head.layers); the
last-layer files are exactly what they were without them.

With TLPIPE_NPROC / TLPIPE_NNODES (tlpipe.train.distributed) each split's batches are dealt out to several
processes round-robin and gathered back in order on rank 0, which alone writes: every image is
computed in the same batch as by one process, so the files are the same.
"""

import time
from pathlib import Path

import torch
import torchvision

from tlpipe import preprocessing
from tlpipe.ingest.decoded import DecodedSplit, read_meta
from tlpipe.ingest.moments import read_stats
from tlpipe.io import atomic_dir, file_hashes, sha256_file, write_json
from tlpipe.manifest import SPLITS, read_manifest
from tlpipe.nets import backbones, inference, layers
from tlpipe.nets.features import save_split
from tlpipe.params import load_params
from tlpipe.paths import FEATURES, FEATURES_METRICS, MANIFEST, STATS, WEIGHTS
from tlpipe.runtime import TlpipeError, inference_batch_size, run_stage
from tlpipe.train import distributed


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
    model, dims, layer_meta = tap_layers(backbone, decoded["preprocessing"]["img_size"])
    started = time.perf_counter()
    dev = group.device
    size = inference_batch_size(dev)
    outputs, ids = {}, {}
    for split in SPLITS:
        images = DecodedSplit(split, meta=decoded)
        ids[split] = images.ids()
        mine = inference.outputs(model, images.batches(size, group.rank, group.world),
                                 mean, std, dev, desc=f"features {split}", progress=group.is_main)
        # an empty split, or a rank without a batch, gives no chunk
        outputs[split] = dict(zip(dims, gather_batches(group, mine, images.batch_lengths(size)).reshape(
            -1, sum(dims.values())).split(list(dims.values()), dim=1)))
    distributed.leave(group)
    seconds = time.perf_counter() - started
    if not group.is_main:
        return
    features = {split: out.pop(layers.LAST) for split, out in outputs.items()}
    if not all(torch.isfinite(f).all() for split in features for f in [features[split], *outputs[split].values()]):
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
        for split in SPLITS:
            save_split(out, split, features[split], labels[ids[split]], ids[split], meta)
            layers.save(out, split, outputs[split], ids[split], {**meta, "layers": layer_meta})
        names = [f"{s}.safetensors" for s in features] + [layers.file_name(s) for s in features]
        # Consumers check these before use (tlpipe.nets.features.load_split, tlpipe.nets.layers.read).
        write_json(out / "meta.json", {**meta, "layers": layer_meta, "files": file_hashes(out, names)})
        sizes = {n: (out / n).stat().st_size for n in names}
    # Timing is not a result: it lives in a metrics file, so the cached features stay bit-identical
    # from run to run.
    write_json(FEATURES_METRICS, {"backbone": name, "images": len(manifest), "seconds": round(seconds, 3),
                                  "ms_per_image": round(1000 * seconds / max(len(manifest), 1), 3),
                                  "device": dev.type, "processes": group.world,
                                  "last_layer_bytes": sum(v for n, v in sizes.items() if not n.startswith("layers-")),
                                  "layers_bytes": sum(v for n, v in sizes.items() if n.startswith("layers-")),
                                  "layer_keys": len(layer_meta["dims"])})
    print(f"{len(manifest)} images -> {backbone.feature_dim}-d features ({name}, weights from "
          f"{backbone.weights_source}: {backbone.weights_file}, {dev.type}, {1000 * seconds / max(len(manifest), 1):.1f} ms/image)"
          + (f", and {len(layer_meta['stages'])} stages pooled to {'/'.join(f'{p}x{p}' for p in layers.POOLS)} "
             f"({sum(layer_meta['dims'].values())} dims)" if layer_meta["stages"] else f"; last layer only "
             f"({layer_meta['note']})"))


def tap_layers(backbone: backbones.Backbone, img_size: int) -> tuple[layers.Tapped, dict[str, int], dict]:
    """The trunk with its stages tapped (tlpipe.nets.layers), {key: dim} of its output's parts in order,
    and the layers' record for meta.json."""
    modules, note = backbones.layer_modules(backbone.name, backbone.trunk)
    stages, note = layers.describe(backbone.trunk, modules, img_size) if modules else ([], note)
    dims = {layers.LAST: backbone.feature_dim, **layers.stage_keys(stages)}
    names = [s["module"] for s in stages]
    model = layers.Tapped(backbone.trunk, names, list(dims), layers.feature_info_channels(backbone.trunk, names))
    return model, dims, {"stages": stages, "pools": list(layers.POOLS), "dims": layers.stage_keys(stages),
                         "note": note}


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
