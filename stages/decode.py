"""decode: every image decoded once into uint8 shards that later stages read.

Every split at the evaluation geometry: resize the short side to image.resize_size, centre-crop
image.img_size. Stats, features, fine-tuning's validation pass and inference read these. The train
split once more at the training geometry (tlpipe.preprocessing.train_geometry: 1.15 x img_size,
centre square) as `train_source`, which fine-tuning cuts its random crops from, so no image file
is opened in its epoch loop. With image.jpeg_draft, large JPEGs are decoded at a reduced scale
first (tlpipe.ingest.images.load_rgb_drafted). Stored as JPEGs of quality image.decoded_quality (0: exact
uint8 pixels; tlpipe.ingest.decoded). Byte-identical run to run.
"""

import torch

from tlpipe import preprocessing
from tlpipe.ingest.decoded import TRAIN_SOURCE, ShardWriter, codec
from tlpipe.ingest.images import eval_images
from tlpipe.io import atomic_dir, sha256_file, write_json
from tlpipe.manifest import SPLITS, image_hashes, image_paths, read_manifest
from tlpipe.params import load_params
from tlpipe.paths import DECODED, MANIFEST
from tlpipe.runtime import progress, run_stage, workers

BATCH = 32  # of the loader only; the shards do not depend on it


def write_split(out, name: str, files: tuple[list, list], rows, geometry: dict, quality: int) -> dict:
    """The images of manifest rows `rows` (`files`: every row's path and sha256), at `geometry`, into
    `name`-NNN shards. Each file's bytes are checked against its sha256 as they are decoded."""
    paths, hashes = files
    dataset = eval_images([paths[i] for i in rows], geometry, [hashes[i] for i in rows])
    # The main process only copies pixels into the shard, so every core may decode.
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers(main_computes=False))
    writer = ShardWriter(out, name, (3, geometry["img_size"], geometry["img_size"]), quality)
    row_ids = torch.tensor(rows)
    for images, positions in progress(loader, desc=f"decode {name}"):
        writer.add(images, row_ids[positions])
    writer.flush()
    return {"images": len(rows), "shards": writer.sizes, "files": writer.files}


def main() -> None:
    params = load_params("decode")
    geometry = preprocessing.geometry(params.image)
    manifest, _ = read_manifest()
    files = image_paths(manifest), image_hashes(manifest)
    quality = params.image.decoded_quality

    meta = {"preprocessing": geometry, "codec": codec(quality), "manifest_sha256": sha256_file(MANIFEST),
            "splits": {}, "files": {}}
    with atomic_dir(DECODED) as out:
        for split in SPLITS:
            meta["splits"][split] = write_split(out, split, files, rows_of(manifest, split), geometry, quality)
        train = preprocessing.train_geometry(geometry)
        meta["splits"][TRAIN_SOURCE] = {**write_split(out, TRAIN_SOURCE, files, rows_of(manifest, "train"), train,
                                                    quality),
                                        "preprocessing": train}
        for split in meta["splits"].values():
            meta["files"].update(split.pop("files"))  # readers check these (tlpipe.ingest.decoded)
        meta["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        write_json(out / "meta.json", meta)
    counts = ", ".join(f"{s} {v['images']}" for s, v in meta["splits"].items())
    print(f"decoded {counts} images at {geometry['img_size']} px ({TRAIN_SOURCE}: {train['img_size']} px) into "
          f"{sum(len(v['shards']) for v in meta['splits'].values())} shards, {meta['bytes'] / 2**20:.1f} MiB "
          f"({'JPEG quality ' + str(quality) if quality else 'exact uint8 pixels'})")


def rows_of(manifest, split: str):
    return manifest.index[manifest["split"] == split].to_numpy()


if __name__ == "__main__":
    run_stage(main)
