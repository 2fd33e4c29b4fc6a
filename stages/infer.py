"""infer: run the fine-tuned model once over the val and test images; per-image class probabilities.

A stage of its own, so that evaluate only turns predictions into metrics: a head-only change then
re-scores the head from cached features and never re-runs the fine-tuned model. The val logits give
the model's temperature (tlpipe/nets/calibration.py: T = 1 where val is too small or too rarely wrong
to fit one), which `tlpipe predict`, the ONNX export and evaluate apply.
"""

import torch
from safetensors.torch import save_file

from tlpipe import preprocessing
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.manifest import read_manifest
from tlpipe.nets import calibration, inference
from tlpipe.nets.models import load_classifier
from tlpipe.params import load_params
from tlpipe.paths import (CLASSES, FINETUNED, FINETUNED_CALIBRATION, FINETUNED_CONFIG, FINETUNED_TEST, FINETUNED_VAL,
                          PREDICTIONS_META)
from tlpipe.runtime import TlpipeError, device, inference_batch_size, run_stage


def main() -> None:
    tta = load_params("infer").infer.tta  # the model's preprocessing comes with its config
    model, cfg = load_classifier(FINETUNED, FINETUNED_CONFIG)
    manifest, classes = read_manifest()
    if cfg["classes"] != classes:
        raise TlpipeError(f"{FINETUNED_CONFIG}: classes differ from {CLASSES}; rerun finetune")
    record, dev = cfg["preprocessing"], device()
    logits = {}
    for split, out in (("val", FINETUNED_VAL), ("test", FINETUNED_TEST)):
        images = DecodedSplit(split)
        preprocessing.check(record, images.geometry, FINETUNED_CONFIG, "rerun finetune")
        proba = inference.class_probabilities(model, images.batches(inference_batch_size(dev)), record["mean"],
                                              record["std"], dev, tta, desc=f"fine-tuned on {split}"
                                              ).reshape(len(images), len(classes))
        if not bool(torch.isfinite(proba).all()):
            raise TlpipeError(f"{FINETUNED}: the fine-tuned model gave non-finite outputs on the {split} images")
        # log-probabilities: the logits up to a per-image constant (with flip TTA, of the averaged
        # probabilities), which is what the temperature divides
        logits[split] = calibration.logits_of(proba)
        with atomic_path(out) as tmp:
            save_file({"proba": proba.contiguous(), "logits": logits[split].contiguous(), "ids": images.ids()},
                      str(tmp))
    write_json(PREDICTIONS_META, {  # evaluate checks these
        "sha256": sha256_file(FINETUNED_TEST), "val_sha256": sha256_file(FINETUNED_VAL)})
    # Where val chose the kept epoch, this temperature is fitted on images not quite unseen;
    # docs/trust.md says why that is the lesser evil on small sets.
    val_labels = torch.tensor(manifest.loc[DecodedSplit("val").ids().numpy(), "target"].to_numpy())
    fit = calibration.calibrate(logits["val"], val_labels, "val")
    write_json(FINETUNED_CALIBRATION, {
        **fit.record(), "fitted_on": "val", "val_images": len(val_labels), "tta": tta,
        "val_log_loss": round(calibration.log_loss(logits["val"], val_labels), 6),
        "val_log_loss_calibrated": round(calibration.log_loss(logits["val"], val_labels, fit.value), 6)})
    print(f"fine-tuned model on {len(logits['val'])} val and {len(logits['test'])} test images ({dev.type}, "
          f"test-time augmentation: {tta}); {calibration.describe(fit)}")


if __name__ == "__main__":
    run_stage(main)
