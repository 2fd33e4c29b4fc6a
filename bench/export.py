"""ONNX export: onnxruntime (CPU) against PyTorch on the same decoded images; parity and file size.

    python bench/export.py [--images DIR] [--n 153] [--passes 3] [--batch-sizes 1,16] [--threads 1,2]

The model is the default backbone (tf_efficientnet_lite0, pretrained) with its own ImageNet head
(1000 classes: real trained weights, so the parity numbers are those of a trained classifier), at
the README's photo geometry (224 px, resize 256, bicubic), exported by tlpipe.deploy.export.to_onnx exactly
as the export stages do. Images: --images (default: ../shared's hymenoptera val/, its test split),
decoded once by tlpipe.ingest.pixels; when that folder is absent, synthetic noise images (said in the output).

- PyTorch: tlpipe.nets.inference.outputs (the evaluation path: normalization, channels_last forward) plus
  softmax, on the CPU.
- onnxruntime: the exported file, CPUExecutionProvider, uint8 batches in.
Both with the same number of intra-op threads, for each of --threads (on a CPU shared with other
jobs, torch's OpenMP threads suffer more from oversubscription than onnxruntime's: compare the
1-thread rows there).
Both run on the same pre-decoded uint8 batches (decoding excluded); images/s is the best of
--passes passes after one warm-up pass. The CPU may be shared with other jobs: the load average is
printed, and numbers from a loaded machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))
from tlpipe.deploy import export  # noqa: E402
from tlpipe.deploy.onnx_model import OnnxModel  # noqa: E402
from tlpipe.ingest.pixels import check_image, load_eval_pixels  # noqa: E402
from tlpipe.nets import backbones, inference  # noqa: E402
from tlpipe.nets.models import Classifier  # noqa: E402

HYMENOPTERA_VAL = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"
GEOMETRY = {"img_size": 224, "resize_size": 256, "interpolation": "bicubic", "jpeg_draft": True}


def images(folder: Path, n: int) -> tuple[np.ndarray, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files = [p for p in files if check_image(p) is None][:n]
    if files:
        return np.stack([load_eval_pixels(p, GEOMETRY) for p in files]), f"{folder} ({len(files)} images)"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8), f"synthetic noise ({n} images; no {folder})"


def best_rate(run, pixels: np.ndarray, batch: int, passes: int) -> float:
    batches = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
    times = []
    for k in range(passes + 1):  # the first pass warms up (allocations, kernel selection)
        start = time.perf_counter()
        for b in batches:
            run(b)
        if k:
            times.append(time.perf_counter() - start)
    return len(pixels) / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=HYMENOPTERA_VAL)
    parser.add_argument("--n", type=int, default=153)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = parser.parse_args()

    pixels, what = images(args.images, args.n)
    backbone = backbones.build("tf_efficientnet_lite0")
    model = Classifier(backbone.trunk, backbone.classifier).eval()
    record = {**GEOMETRY, "normalize": "backbone", "mean": list(backbone.mean), "std": list(backbone.std)}
    cpu = torch.device("cpu")

    def torch_proba(batch: np.ndarray) -> np.ndarray:
        x = [(torch.from_numpy(batch), None)]
        return torch.softmax(inference.outputs(model, x, record["mean"], record["std"], cpu, progress=False),
                             dim=1).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        metadata = {"classes": json.dumps([f"imagenet{i}" for i in range(1000)]),
                    "preprocessing": json.dumps(record), "temperature": "1.0",
                    "source_sha256": backbone.weights_sha256}
        export.to_onnx(model, record, 1.0, metadata, path)  # ImageNet's head: no fitted temperature
        export_s = time.perf_counter() - start
        size = path.stat().st_size
        runtime = OnnxModel(path)

        expected = np.concatenate([torch_proba(pixels[i:i + 16]) for i in range(0, len(pixels), 16)])
        got = np.concatenate([runtime.proba(pixels[i:i + 16]) for i in range(0, len(pixels), 16)])
        diff = np.abs(got.astype(np.float64) - expected)
        agree = int((got.argmax(1) == expected.argmax(1)).sum())

        rows = []
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            runtime = OnnxModel(path, threads=threads)
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                pt = best_rate(torch_proba, pixels, batch, args.passes)
                ox = best_rate(runtime.proba, pixels, batch, args.passes)
                rows.append((threads, batch, pt, ox))

    import onnxruntime as ort

    load = os.getloadavg()
    print(f"## ONNX export: onnxruntime vs PyTorch, CPU ({what}, 224 px)\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}; load "
          f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min): a shared CPU makes these "
          f"numbers noisy.\n")
    print(f"File: {size / 2**20:.1f} MiB ({size} bytes), opset {export.OPSET}, exported in {export_s:.1f} s.")
    print(f"Parity on {len(pixels)} images, 1000 ImageNet classes: largest |probability difference| "
          f"{diff.max():.2e}, mean {diff.mean():.2e}; argmax identical on {agree}/{len(pixels)}.\n")
    print(f"images/s, best of {args.passes} passes over the {len(pixels)} pre-decoded images:\n")
    print("| threads | batch | PyTorch images/s | onnxruntime images/s | onnxruntime / PyTorch |")
    print("|---|---|---|---|---|")
    for threads, batch, pt, ox in rows:
        print(f"| {threads} | {batch} | {pt:.1f} | {ox:.1f} | {ox / pt:.2f}x |")


if __name__ == "__main__":
    main()
