"""`tlpipe summary`: the few lines of a run that matter, read from metrics/*.json.

Each model's test accuracy with its 95 % interval, the paired verdict, which model val says to ship,
whether each model's probabilities are calibrated (and why not), how the fine-tuned epoch was kept,
the warnings about val's size and copies across splits, and where the plots and per-image results are. `make repro`
ends with it; every line fits in WIDTH characters (longer ones wrap, indented).
"""

from __future__ import annotations

import textwrap

from tlpipe.io import read_json
from tlpipe.paths import (DATA_METRICS, FINETUNE_METRICS, GALLERY, RELIABILITY, SCRATCH_METRICS, TEST_DUPLICATES,
                          TEST_METRICS, TEST_PREDICTIONS)
from tlpipe.runtime import TlpipeError

WIDTH = 119  # a line is at most this long
MODELS = {"head": "head", "finetuned": "fine-tuned"}


def _optional(path) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError:
        return {}


def _accuracy(s: dict) -> str:
    return f"accuracy {s['accuracy']:.3f} [{s['accuracy_low']:.3f}, {s['accuracy_high']:.3f}]"


def _calibration(s: dict) -> str:
    if s.get("calibrated", True):
        return (f"temperature {s['temperature']:.2f}: log loss {s['log_loss']:.3f} -> {s['log_loss_calibrated']:.3f}, "
                f"ECE {s['ece']:.3f} -> {s['ece_calibrated']:.3f}")
    return f"log loss {s['log_loss']:.3f}, ECE {s['ece']:.3f}; not calibrated (T = 1): {s['calibration_reason']}"


def ship_line(v: dict) -> str:
    """What val says to ship, in one line (evaluate prints it too)."""
    if not v["images"]:
        return "no val images to compare the two models on: ship the head (models/head.*), which needs no fine-tuning"
    se = "" if v["log_loss_difference_se"] is None else f" ± {v['log_loss_difference_se']:.4f}"
    advice = ("ship the fine-tuned model (models/finetuned.*)" if v["ship"] == "finetuned" else
              "ship the head (models/head.*): fine-tuning did not significantly beat it on val")
    return (f"on {v['images']} val images: accuracy head {v['head_accuracy']:.3f} (held out) vs fine-tuned "
            f"{v['finetuned_accuracy']:.3f} ({v['head_only_right']} vs {v['finetuned_only_right']} right by one "
            f"only, exact McNemar p = {v['p_value']:.3g}), calibrated log loss {v['head_log_loss']:.4f} vs "
            f"{v['finetuned_log_loss']:.4f} ({v['log_loss_difference']:+.4f}{se}): {v['verdict']}; {advice}")


def lines() -> list[str]:
    """The summary, unwrapped: one entry per statement."""
    try:
        test = read_json(TEST_METRICS)
    except FileNotFoundError:
        raise TlpipeError(f"{TEST_METRICS}: missing; run `dvc repro` first") from None
    data, finetune, scratch = _optional(DATA_METRICS), _optional(FINETUNE_METRICS), _optional(SCRATCH_METRICS)
    n_test = sum(test["paired"][k] for k in ("head_only_right", "finetuned_only_right", "both_right", "both_wrong"))
    split = (f" ({data['train_images']} train, {data['val_images']} val, {data['classes']} classes)"
             if {"train_images", "val_images", "classes"} <= set(data) else "")
    out = [f"on the test split: {n_test} images{split}; 95 % intervals in brackets"]
    width = max(len(label) for label in MODELS.values())
    for model, label in MODELS.items():
        out.append(f"{label:<{width}}  {_accuracy(test[model])}; {_calibration(test[model])}")
    if scratch.get("scratch", {}).get("trained") and "accuracy_low" in scratch["scratch"]:
        out.append(f"{'scratch':<{width}}  {_accuracy(scratch['scratch'])} (the CNN trained from scratch)")
    p = test["paired"]
    out.append(f"head vs fine-tuned: {p['verdict']} (exact McNemar p = {p['p_value']:.3g}; {p['head_only_right']} "
               f"vs {p['finetuned_only_right']} test images right by one model only)")
    if "best_epoch" in finetune:
        how = finetune.get("kept_by", "val_loss").replace("_", " ")
        out.append(f"fine-tuned model: epoch {finetune['best_epoch']} of {finetune['epochs_run']} "
                   f"({finetune['kept_weights']} weights), kept by {how}")
        if finetune.get("beats_probe_on_val") is False:
            out.append("fine-tuning did not beat the probe on val: the probe is kept; ship the head")
    if "val_comparison" in test:  # which model val says to ship (tlpipe.report.test_scores)
        out.append(ship_line(test["val_comparison"]))
    if "search" in finetune:
        search = finetune["search"]
        out.append(f"recipe auto chose {search['chosen']}: {search['reason']}"
                   + (f" (search: {search['epochs_spent']} epochs, {search['seconds']:.0f} s"
                      + (f", {search['fraction_of_final_run']:.2f} x the full run's time"
                         if "fraction_of_final_run" in search else "") + ")" if search["searched"] else ""))
    v = test["val"]
    if v["val_too_small"]:
        from tlpipe.ingest.audit import val_warning
        out.append(val_warning(v))
    d = test["duplicates"]
    copies = d.get("exact_across_splits", 0) + d.get("near_across_splits", 0)
    if copies or d.get("label_conflicts"):
        pairs = ", ".join(f"{d[k]} {k[7:].replace('_', '/')}" for k in ("across_train_test", "across_test_val",
                                                                          "across_train_val") if d.get(k))
        leak = "; test is involved: its scores are inflated" if "test" in pairs else ""
        out.append(f"warning: {copies} image pair(s) copied across splits ({pairs or 'none'}){leak}; "
                   f"{d.get('label_conflicts', 0)} label conflict(s); listed in {TEST_DUPLICATES}")
    out.append(f"plots: dvc plots show (curves, confusion matrices); {RELIABILITY}; misclassified: {GALLERY}/")
    out.append(f"per image: {TEST_PREDICTIONS}/; all numbers: metrics/*.json; experiments side by side: tlpipe compare")
    return out


def render() -> str:
    wrapped = [textwrap.wrap(line, WIDTH, subsequent_indent="    ", break_on_hyphens=False) for line in lines()]
    return "\n".join(part for parts in wrapped for part in parts)
