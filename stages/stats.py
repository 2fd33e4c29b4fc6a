"""stats: exact per-channel mean and std of the training split at the pipeline's input geometry.

One streaming pass over the decode stage's uint8 shards, counting a per-channel histogram of the
256 levels (tlpipe.ingest.moments): integers, so the result is exact whatever the batch size.
Values are on the 0..1 scale that models normalize.
"""


from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.ingest.moments import ChannelMoments
from tlpipe.io import write_json
from tlpipe.params import load_params
from tlpipe.paths import STATS
from tlpipe.runtime import progress, run_stage

BATCH = 256  # pixels already decoded: big batches only amortize the per-batch overhead


def main() -> None:
    load_params("stats")  # validates params.yaml; the geometry comes with the decoded images
    train = DecodedSplit("train")
    moments = ChannelMoments()
    for images, _ in progress(train.batches(BATCH), desc="stats"):
        moments.update(images)

    stats = {
        "mean": moments.mean.tolist(),
        "std": moments.std.tolist(),
        "pixels_per_channel": moments.count,
        "images": len(train),
        "preprocessing": train.geometry,
    }
    write_json(STATS, stats)
    print(f"mean {[round(v, 4) for v in stats['mean']]} std {[round(v, 4) for v in stats['std']]} "
          f"over {len(train)} train images")


if __name__ == "__main__":
    run_stage(main)
