"""recipe_curves: val loss after every epoch of some of the recipe search's candidates, each on the full
run's schedule (finetune.epochs, its warmup) from the same LP start, no early stopping: where a bold
candidate's val loss passes a timid one's. The evidence behind recipe_search.MIN_STEPS_PAST_WARMUP.

    cd PROJECT && PYTHONPATH=REPO python REPO/bench/recipe_curves.py [--epochs N] [--candidates A,B] [--stop N]

PROJECT: a scaffolded project whose features and decode stages have run (e.g. one of bench/recipe.py's);
--epochs: the schedule's length (default finetune.epochs); --candidates: comma-separated names of
recipe_search.FAMILY (default all); --stop: train only the first N epochs of that schedule.
One JSON line per epoch (candidate, epoch, val loss, seconds) and one per candidate.
"""

import argparse
import json
import time

import torch

from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.params import load_params
from tlpipe.runtime import inference_batch_size
from tlpipe.train import distributed, finetuning, recipe_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="the schedule's length (default finetune.epochs)")
    parser.add_argument("--candidates", default=",".join(recipe_search.BOLDNESS),
                        help="comma-separated names of recipe_search.FAMILY")
    parser.add_argument("--stop", type=int, help="train only the first N epochs of the schedule")
    args = parser.parse_args()
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in recipe_search.FAMILY]
    if unknown:  # one line, before any training
        parser.error(f"--candidates: unknown {unknown[0]!r} (one of {', '.join(recipe_search.FAMILY)})")
    params = load_params("finetune")
    ft, seed = params.finetune, params.seed
    group = distributed.join()
    start = finetuning.begin(ft, seed)
    record = start.provenance["preprocessing"]
    val_batches = DecodedSplit("val").batches(inference_batch_size(group.device), 0, 1)
    start.model.to(group.device, memory_format=torch.channels_last)
    probe = {k: v.clone() for k, v in start.model.state_dict().items()}
    loss, acc = finetuning.evaluate(start.model, val_batches, start.targets, record, group)
    print(json.dumps({"probe": loss, "acc": acc}), flush=True)
    epochs = args.epochs or ft.epochs
    stop = args.stop or epochs
    for name in names:
        start.model.load_state_dict(probe)
        torch.manual_seed(seed)  # as the search does for each candidate
        cand = recipe_search.Settings(ft, **recipe_search.knobs(name, len(start.blocks)), epochs=epochs)
        run = finetuning.make_run(start, cand, group, seed)
        began, out = time.perf_counter(), []
        for epoch in range(1, stop + 1):
            finetuning.train_one_epoch(run, epoch)
            scores = finetuning.score_on_val(start.model, run.ema, val_batches, start.targets, record, group)
            out.append(round(scores["val/loss"], 4))
            print(json.dumps({"cand": name, "epoch": epoch, "val_loss": out[-1],
                              "sec": round(time.perf_counter() - began, 1)}), flush=True)
        print(json.dumps({"cand": name, "steps_per_epoch": len(run.batches), "val_loss": out,
                          "sec": round(time.perf_counter() - began, 1)}), flush=True)


if __name__ == "__main__":
    main()
