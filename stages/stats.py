"""stats: exact per-channel mean and std of the training split at the pipeline's input geometry.

One streaming pass: batches of decoded, resized, centre-cropped uint8 images; each batch's count,
mean and sum of squared deviations are merged in float64 (Chan et al.), so the result is exact to
float64 rounding whatever the batch size. Values are on the 0..1 scale that models normalize.
"""

from pathlib import Path

import torch
from tqdm import tqdm

from tlpipe.images import ImageFiles, eval_transform
from tlpipe.io import write_json
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.params import load_params
from tlpipe.runtime import inference_batch_size, progress_enabled, run_stage, workers

OUT = Path("data/stats.json")


class ChannelMoments:
    def __init__(self, channels: int = 3):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, batch: torch.Tensor) -> None:
        """batch: uint8 NCHW."""
        x = batch.to(torch.float64).div_(255.0).transpose(0, 1).reshape(batch.shape[1], -1)
        n = x.shape[1]
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count).sqrt()


def main() -> None:
    params = load_params("stats")
    img_size, resize_size = params.image.img_size, params.image.resize_size
    interpolation = params.image.interpolation

    manifest, _ = read_manifest()
    train = manifest[manifest["split"] == "train"]
    dataset = ImageFiles(image_paths(train), eval_transform(img_size, resize_size, interpolation))
    loader = torch.utils.data.DataLoader(dataset, batch_size=inference_batch_size(),
                                         num_workers=workers())
    moments = ChannelMoments()
    for images, _ in tqdm(loader, desc="stats", disable=not progress_enabled()):
        moments.update(images)

    stats = {
        "mean": moments.mean.tolist(),
        "std": moments.std.tolist(),
        "pixels_per_channel": moments.count,
        "images": len(dataset),
        "geometry": {"img_size": img_size, "resize_size": resize_size, "interpolation": interpolation},
    }
    write_json(OUT, stats)
    print(f"mean {[round(v, 4) for v in stats['mean']]} std {[round(v, 4) for v in stats['std']]} "
          f"over {len(dataset)} train images")


if __name__ == "__main__":
    run_stage(main)
