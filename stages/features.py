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

import torch

from tlpipe.ingest.decoded import DecodedSplit, read_meta
from tlpipe.ingest.moments import read_stats
from tlpipe.io import atomic_dir, file_hashes, write_json
from tlpipe.manifest import SPLITS, read_manifest
from tlpipe.nets import backbones, extraction, inference, layers
from tlpipe.nets.features import save_split
from tlpipe.params import load_params
from tlpipe.paths import FEATURES, FEATURES_METRICS, STATS
from tlpipe.runtime import TlpipeError, inference_batch_size, run_stage
from tlpipe.train import distributed


def main() -> None:
    params = load_params("features")
    if distributed.requested() != (1, 1) and not distributed.launched():
        distributed.launch("stages.features")
        return
    group = distributed.join()
    name, normalize, weights = params.backbone.name, params.backbone.normalize, params.backbone.weights
    backbones.entry(name)  # an unknown name fails here, before any work
    extraction.check_weights_path(weights, group.is_main)

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
    model, dims, layer_meta = extraction.tap_layers(backbone, decoded["preprocessing"]["img_size"])
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
        outputs[split] = dict(zip(dims, distributed.gather_batches(group, mine, images.batch_lengths(size)).reshape(
            -1, sum(dims.values())).split(list(dims.values()), dim=1)))
    distributed.leave(group)
    seconds = time.perf_counter() - started
    if not group.is_main:
        return
    features = {split: out.pop(layers.LAST) for split, out in outputs.items()}
    if not all(torch.isfinite(f).all() for split in features for f in [features[split], *outputs[split].values()]):
        raise TlpipeError(f"backbone {name} produced non-finite features; check the images and weights")

    meta = extraction.provenance(backbone, classes, decoded, normalize, mean, std, dev)
    labels = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    with atomic_dir(FEATURES) as out:
        for split in SPLITS:
            save_split(out, split, features[split], labels[ids[split]], ids[split], meta)
            layers.save(out, split, outputs[split], ids[split], {**meta, "layers": layer_meta})
        names = [f"{s}.safetensors" for s in features] + [layers.file_name(s) for s in features]
        # Consumers check these before use (tlpipe.nets.features.load_split, tlpipe.nets.layers.read).
        write_json(out / "meta.json", {**meta, "layers": layer_meta, "files": file_hashes(out, names)})
        sizes = {n: (out / n).stat().st_size for n in names}
    write_json(FEATURES_METRICS, extraction.run_metrics(name, len(manifest), seconds, dev, group.world, sizes,
                                                        layer_meta))
    print(extraction.summary_line(backbone, len(manifest), seconds, dev, layer_meta))


if __name__ == "__main__":
    run_stage(main)
