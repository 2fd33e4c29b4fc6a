"""scratch: optional baseline, a small CNN trained from scratch on the same train/val/test split.

DVC cannot skip a stage by param, so with `scratch.enabled: false` (the default) this stage runs
anyway but only writes metrics/scratch.json saying so ({"scratch": {"trained": false}}), in a
fraction of a second: torch is imported only when the baseline is trained. Every scratch param is read up front either way, so the params
the stage reads are exactly the params it declares. Normalized with the train split's own
statistics (data/stats.json): a network trained from scratch has no pretraining statistics.
"""

from tlpipe.io import write_json
from tlpipe.params import load_params
from tlpipe.paths import SCRATCH_METRICS as METRICS, STATS
from tlpipe.runtime import run_stage


def main() -> None:
    params = load_params("scratch")
    scratch = params.scratch
    settings = dict(epochs=scratch.epochs, batch_size=scratch.batch_size, lr=scratch.lr,
                    weight_decay=scratch.weight_decay, width=scratch.width, hflip=scratch.hflip, seed=params.seed)
    if not scratch.enabled:
        write_json(METRICS, {"scratch": {"trained": False}})
        print("scratch baseline disabled (scratch.enabled: false); wrote metrics/scratch.json")
        return

    import torch  # the heavy imports, only when the baseline is trained

    from tlpipe.ingest.decoded import DecodedSplit
    from tlpipe.ingest.moments import read_stats
    from tlpipe.manifest import SPLITS, read_manifest
    from tlpipe.report.metrics import summary
    from tlpipe.runtime import device
    from tlpipe.train.scratch import predict_proba, train

    manifest, classes = read_manifest()
    mean, std = read_stats(STATS, "the scratch baseline (which normalizes by dataset statistics)")
    targets = torch.tensor(manifest["target"].to_numpy(), dtype=torch.int64)
    # The baseline is small and trains for many epochs: all of its images stay in memory.
    images, ids = {}, {}
    for name in SPLITS:
        decoded = DecodedSplit(name)
        images[name], ids[name] = decoded.rows(0, len(decoded))
    dev = device()
    model, run = train(images["train"], targets[ids["train"]], images["val"], targets[ids["val"]],
                               len(classes), mean=mean, std=std, dev=dev, **settings)
    proba = predict_proba(model, images["test"], mean, std, dev)
    test = summary(targets[ids["test"]].numpy(), proba.numpy())
    # One "scratch" block, so `dvc exp show` has scratch.accuracy beside head.* and finetuned.*
    write_json(METRICS, {"scratch": {"trained": True, **test, "val_accuracy": round(run["val_accuracy"], 6),
                                     "val_loss": round(run["val_loss"], 6), "best_epoch": run["epoch"],
                                     "parameters": run["parameters"]}})
    print(f"scratch CNN ({run['parameters']} parameters): kept epoch {run['epoch']}, test accuracy "
          f"{test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}")


if __name__ == "__main__":
    run_stage(main)
