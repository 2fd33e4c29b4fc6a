"""finetune: LP-FT. Put the linear probe on the pretrained backbone, then fine-tune the whole model.

The probe is fitted here, from the cached features at `finetune.probe_l2`, rather than read from
the head stage: it takes a second, and it keeps fine-tuning independent of the head's params, so
sweeping the head never re-runs the expensive stage. With `probe_l2` equal to the head's chosen L2
the two are the same classifier. The recipe (tlpipe.train.finetuning): backbone LR = head LR x
backbone_lr_mult; the checkpoint with the best val loss is kept; training stops after `patience`
epochs without improvement (warmup epochs not counted). A val below audit.MIN_VAL_PER_CLASS images
in some class chooses nothing: the schedule's last epoch is kept, with no early stopping
(`kept_by: schedule` in the metrics, and why). After every epoch the whole training state goes to
models/.resume/ (tlpipe.train.checkpoints), so a killed run continues from its last finished epoch
with the result of an uninterrupted one. The outputs are written by tlpipe.train.finetune_outputs.

`recipe: auto` first runs a budgeted search on val (tlpipe.train.recipe_search) for how much of the
backbone to train and how hard; its winner's settings drive the run, and its report goes into
metrics/finetune.json and the plot metrics/finetune_search.csv.

Several processes (GPUs or nodes): TLPIPE_NPROC / TLPIPE_NNODES relaunch this module under
torchrun (tlpipe.train.distributed), as DistributedDataParallel. `batch_size` stays the global batch and
each optimizer step sees the same images however many processes share it; rank 0 alone writes.
"""

import time

from tlpipe import preprocessing
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.params import load_params
from tlpipe.paths import FEATURES
from tlpipe.runtime import inference_batch_size, run_stage
from tlpipe.train import checkpoints, distributed, finetune_outputs, finetuning, recipe_search


def main() -> None:
    params = load_params("finetune")
    if distributed.requested() != (1, 1) and not distributed.launched():
        distributed.launch("stages.finetune")
        return
    group, finetune, seed = distributed.join(), params.finetune, params.seed
    settings = {"seed": seed, "finetune": finetune.dump()}
    finetuning.check_batch_size(finetune, group.world)
    start = finetuning.begin(finetune, seed)
    model, record, dev = start.model, start.provenance["preprocessing"], group.device
    val = DecodedSplit("val")
    preprocessing.check(record, val.geometry, FEATURES / "meta.json", "rerun the features stage")
    val_batches = val.batches(inference_batch_size(dev), group.rank, group.world)

    # Resume only a run with exactly these inputs, code and device (its results would differ else).
    checkpoint = checkpoints.EpochCheckpoint(checkpoints.finetune_run_key(settings, dev.type))
    if group.is_main:
        checkpoint.remove_others()
    say = print if group.is_main else (lambda *_: None)
    search = None
    if finetune.recipe == "auto":  # the family's knobs from a budgeted search on val (tlpipe.train.recipe_search)
        finetune, search = recipe_search.search(start, finetune, group, seed, val_batches, checkpoint.folder.name,
                                                say)
        say(f"recipe auto: {search['chosen']} ({search['reason']})")
    began = time.perf_counter()
    run = finetuning.make_run(start, finetune, group, seed)
    run.checkpoint_folder = checkpoint.folder
    kept_by, why = finetuning.kept_by(start.provenance["classes"], run.ema is not None)
    say(f"kept by {kept_by.replace('_', ' ')}: {why}")
    progress = finetuning.Progress.resume(checkpoint, run, kept_by)
    if progress is None:
        progress = finetuning.Progress.from_probe(model, *finetuning.evaluate(model, val_batches, start.targets,
                                                                              record, group), kept_by)
        say(f"epoch 0 (the probe on the frozen backbone): val loss {progress.best['val_loss']:.4f} "
            f"acc {progress.best['val_accuracy']:.4f}")
    else:
        say(f"resuming after epoch {progress.epoch} from {checkpoint.folder}")

    for epoch in range(progress.epoch + 1, finetune.epochs + 1):
        if progress.stopped:
            break
        train_loss = finetuning.train_one_epoch(run, epoch)
        scores = finetuning.score_on_val(model, run.ema, val_batches, start.targets, record, group)
        run.step_scheduler(scores["val/loss"])
        say(f"epoch {epoch}: train loss {train_loss:.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        progress.end_epoch(epoch, {"train/loss": train_loss, **scores, **run.lrs()}, model, finetune, run.ema)
        if progress.stopped:
            say(f"early stop: val loss has not improved for {finetune.patience} epochs")
        if group.is_main:
            progress.save(checkpoint, run)
    distributed.barrier(group)  # every rank finished cleanly before anything is written
    if group.is_main:
        if search is not None:  # the search's cost against the run it chose (this process's share)
            search["final_run_seconds"] = round(time.perf_counter() - began, 1)
            search["fraction_of_final_run"] = round(search["seconds"] / max(search["final_run_seconds"], 1e-9), 3)
            say(f"recipe auto: the search took {search['seconds']:.0f} s, {search['fraction_of_final_run']:.2f} x "
                f"the {search['final_run_seconds']:.0f} s of the run it chose (planned: "
                f"{search.get('planned_fraction', 0):.2f} x its {finetune.epochs} epochs)")
        finetune_outputs.write(model, progress, start.provenance, finetune.probe_l2, checkpoint.folder.name, why,
                               search)
        recipe_search.search_checkpoint(checkpoint.folder.name).remove()
        checkpoint.remove()
    distributed.leave(group)


if __name__ == "__main__":
    run_stage(main)
