"""decode: every image decoded once, resized and centre-cropped to the input geometry, into shards.

Stats, features, fine-tuning's validation pass and inference read these uint8 pixels instead of
decoding JPEGs again (tlpipe.decoded). Resize the short side to image.resize_size, centre-crop
image.img_size; with image.jpeg_draft, large JPEGs are decoded at a reduced scale first
(tlpipe.images.load_rgb_drafted). Byte-identical run to run.
"""

import torch

from tlpipe import preprocessing
from tlpipe.decoded import ShardWriter
from tlpipe.images import eval_images
from tlpipe.io import atomic_dir, sha256_file, write_json
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.params import load_params
from tlpipe.paths import DECODED, MANIFEST
from tlpipe.runtime import progress, run_stage, workers

BATCH = 32  # of the loader only; the shards do not depend on it


def main() -> None:
    params = load_params("decode")
    geometry = preprocessing.geometry(params.image)
    manifest, _ = read_manifest()
    paths = image_paths(manifest)
    shape = (3, geometry["img_size"], geometry["img_size"])

    meta = {"preprocessing": geometry, "manifest_sha256": sha256_file(MANIFEST), "splits": {}}
    with atomic_dir(DECODED) as out:
        for split in ("train", "val", "test"):
            rows = manifest.index[manifest["split"] == split].to_numpy()
            # The main process only copies pixels into the shard, so every core may decode.
            loader = torch.utils.data.DataLoader(eval_images([paths[i] for i in rows], geometry),
                                                 batch_size=BATCH, num_workers=workers(main_computes=False))
            writer = ShardWriter(out, split, shape)
            row_ids = torch.tensor(rows)
            for images, positions in progress(loader, desc=f"decode {split}"):
                writer.add(images, row_ids[positions])
            writer.flush()
            meta["splits"][split] = {"images": len(rows), "shards": writer.sizes}
            meta.setdefault("files", {}).update(writer.files)  # readers check these (tlpipe.decoded)
        meta["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))

        write_json(out / "meta.json", meta)
    counts = ", ".join(f"{s} {v['images']}" for s, v in meta["splits"].items())
    print(f"decoded {counts} images at {shape[1]}x{shape[2]} into "
          f"{sum(len(v['shards']) for v in meta['splits'].values())} shards, {meta['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    run_stage(main)
