"""What the finetune stage writes once its run is over: curves, the kept model, its metrics.

`write` logs every epoch's record to metrics/finetune_curves/ (dvclive), saves the kept epoch's
weights as models/finetuned.safetensors with their config (the features' provenance, the probe's
L2, the kept epoch and why, the run's resume key), the recipe search's plot and
metrics/finetune.json, and says what was kept. Only the finetune stage imports this module.
"""

from __future__ import annotations

from dvclive import Live

from tlpipe.io import write_json, writing
from tlpipe.nets.features import provenance_of
from tlpipe.nets.models import save_classifier
from tlpipe.paths import FINETUNE_CURVES, FINETUNE_METRICS, FINETUNE_SEARCH_PLOT, FINETUNED, FINETUNED_CONFIG
from tlpipe.train import finetuning, recipe_search


def write(model, progress: finetuning.Progress, provenance: dict, probe_l2: float, resume_key: str,
          why: str, search: dict | None) -> None:
    with writing(FINETUNE_CURVES), Live(str(FINETUNE_CURVES), dvcyaml=False, save_dvc_exp=False) as live:
        for step, record in enumerate(progress.history):
            live.step = step
            for name, value in record.items():
                live.log_metric(name, value)
    best = progress.best
    model.load_state_dict(best["state"])
    save_classifier(model, FINETUNED, FINETUNED_CONFIG, {**provenance_of(provenance), "probe_l2": probe_l2,
                                                          "best_epoch": best["epoch"], "weights": best["weights"],
                                                          "kept_by": progress.kept_by, "kept_reason": why,
                                                          # its checkpoint is stale once these outputs exist
                                                          "resume_key": resume_key})
    first = progress.history[0]
    beats = best["epoch"] > 0 and best["val_loss"] < first["val/loss"]
    recipe_search.write_plot(FINETUNE_SEARCH_PLOT, first["val/loss"], search)
    write_json(FINETUNE_METRICS, {
        "initial_val_accuracy": round(first["val/accuracy"], 6), "initial_val_loss": round(first["val/loss"], 6),
        "best_epoch": best["epoch"], "kept_weights": best["weights"], "kept_by": progress.kept_by, "kept_reason": why,
        "epochs_run": len(progress.history) - 1,
        "val_loss": round(best["val_loss"], 6), "val_accuracy": round(best["val_accuracy"], 6),
        "beats_probe_on_val": beats if progress.kept_by == "val_loss" else None,
        **({"search": search} if search is not None else {})})
    print(f"kept epoch {best['epoch']} ({best['weights']} weights) by {progress.kept_by.replace('_', ' ')}: "
          f"val loss {best['val_loss']:.4f} acc {best['val_accuracy']:.4f}")
    if progress.kept_by == "val_loss" and not beats:
        print(f"fine-tuning did not beat the probe on val (val loss {first['val/loss']:.4f}): the probe is kept; "
              "ship the head (models/head.*) and save the training")

