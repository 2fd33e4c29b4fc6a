"""Decoded crops of images smaller than the crop: stored at their own size, upsampled when read (offline check).

    python bench/native_crops.py PROJECT [--split test] [--quality 95] [--limit N]

PROJECT is a project after `dvc repro` (its decoded JPEG shards, its features' backbone, its head). For each
image of the split: the exact crop (the evaluation path on the source file), today's shard (a JPEG of the
upsampled crop), and the alternative: a JPEG of the decoded source at its own size, decoded and resized and
cropped when read by the same PIL code the decode stage uses (tlpipe.ingest.pixels.eval_pixels). Prints the
bytes per image of each, the read time of the alternative, the features' cosine of each to the exact crop's
(the project's backbone, tapped as the features stage taps it), and the project's head (not refitted) on all
three with McNemar between today's and the alternative. Nothing in the project is written.
Run from this checkout with the project's data present; the project's own code is imported (its stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--limit", type=int, default=0, help="only the split's first N images (a quick check)")
    args = parser.parse_args()
    project = args.project.resolve()
    sys.path.insert(0, str(project))
    os.chdir(project)
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    try:
        from tlpipe.nets.extraction import tap_layers
    except ImportError:  # a project of a tlpipe before 85fd7e2 (the taps in the features stage)
        from stages.features import tap_layers
    from tlpipe.ingest.decoded import DecodedSplit, read_meta
    from tlpipe.ingest.pixels import eval_load, eval_pixels
    from tlpipe.manifest import image_paths, read_manifest
    from tlpipe.nets import backbones, inference, layers
    from tlpipe.report.metrics import mcnemar

    meta = read_meta()
    geo = meta["preprocessing"]
    manifest, _ = read_manifest()
    paths = image_paths(manifest)
    split = DecodedSplit(args.split, meta=meta)
    n = min(len(split), args.limit) if args.limit else len(split)
    today, ids = split.rows(0, n)
    offsets = torch.cat([split._shard(k).get_tensor("offsets").diff() for k in range(len(split.sizes))])[:n]
    exact, native, sizes, read = [], [], [], 0.0
    for i in ids.tolist():
        img = eval_load(Path(paths[i]), geo)
        exact.append(torch.from_numpy(eval_pixels(img, geo["img_size"], geo["resize_size"], geo["interpolation"])))
        data = encode_jpeg(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), quality=args.quality)
        sizes.append(len(data))
        start = time.perf_counter()
        back = Image.fromarray(decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy())
        native.append(torch.from_numpy(eval_pixels(back, geo["img_size"], geo["resize_size"], geo["interpolation"])))
        read += time.perf_counter() - start
    exact, native = torch.stack(exact), torch.stack(native)
    print(f"{args.split}: {len(ids)} images at {geo['img_size']} px (resize {geo['resize_size']})")
    print(f"bytes per image: own-size JPEG q{args.quality} {np.mean(sizes):.0f}, today's crop {offsets.double().mean():.0f}")
    print(f"own-size JPEG decoded, resized and cropped when read: {1e3 * read / len(ids):.2f} ms per image")

    backbone = backbones.build(json.loads((project / "data/features/meta.json").read_text())["backbone"])
    model, dims, _ = tap_layers(backbone, geo["img_size"])

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = inference.outputs(model, [(x[k:k + 32], None) for k in range(0, len(x), 32)], backbone.mean,
                                backbone.std, torch.device("cpu"), progress=False)
        return dict(zip(dims, out.reshape(-1, sum(dims.values())).split(list(dims.values()), dim=1)))

    f_exact, f_today, f_native = features(exact), features(today), features(native)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)

    for name, f in (("today's crop", f_today), ("own size, upsampled when read", f_native)):
        last = cosine(f["last"], f_exact["last"])
        every = cosine(torch.cat(list(f.values()), 1), torch.cat(list(f_exact.values()), 1))
        print(f"{name}: cosine to the exact crop's features, last layer mean {last.mean():.5f} "
              f"(1st percentile {np.quantile(last.numpy(), 0.01):.5f}, min {last.min():.5f}); every layer mean "
              f"{every.mean():.5f} (min {every.min():.5f})")
    cfg = json.loads((project / "models/head.json").read_text())
    keys = layers.of_model(cfg)
    head = load_file(str(project / "models/head.safetensors"))
    truth = torch.tensor(manifest["target"].to_numpy())[ids].numpy()
    predicted = {}
    for name, f in (("exact", f_exact), ("today", f_today), ("own size", f_native)):
        logits = layers.concat(f, keys).double() @ head["weight"].double().T + head["bias"].double()
        predicted[name] = logits.argmax(1).numpy()
        right = int((predicted[name] == truth).sum())
        print(f"head ({len(keys)} layer keys) on {name}: {right}/{len(truth)} = {right / len(truth):.4f}")
    print("McNemar, today (a) vs own size (b):", mcnemar(truth, predicted["today"], predicted["own size"]))


if __name__ == "__main__":
    main()
