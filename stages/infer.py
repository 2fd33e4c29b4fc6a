"""infer: run the fine-tuned model once over the test images; per-image class probabilities.

A stage of its own, so that evaluate only turns predictions into metrics: a head-only change then
re-scores the head from cached features and never re-runs the fine-tuned model.
"""

from safetensors.torch import save_file

from tlpipe import inference, preprocessing
from tlpipe.decoded import DecodedSplit
from tlpipe.io import atomic_path
from tlpipe.manifest import read_manifest
from tlpipe.models import load_classifier
from tlpipe.params import load_params
from tlpipe.paths import FINETUNED, FINETUNED_CONFIG, FINETUNED_TEST
from tlpipe.runtime import TlpipeError, device, inference_batch_size, run_stage


def main() -> None:
    tta = load_params("infer").infer.tta  # the model's preprocessing comes with its config
    model, cfg = load_classifier(FINETUNED, FINETUNED_CONFIG)
    _, classes = read_manifest()
    if cfg["classes"] != classes:
        raise TlpipeError(f"{FINETUNED_CONFIG}: classes differ from data/prepared/classes.json; rerun finetune")
    test = DecodedSplit("test")
    record = cfg["preprocessing"]
    preprocessing.check(record, test.geometry, FINETUNED_CONFIG, "rerun finetune")
    dev = device()
    proba = inference.class_probabilities(model, test.batches(inference_batch_size(dev)), record["mean"],
                                          record["std"], dev, tta, desc="fine-tuned on test").reshape(len(test), len(classes))
    with atomic_path(FINETUNED_TEST) as tmp:
        save_file({"proba": proba.contiguous(), "ids": test.ids()}, str(tmp))
    print(f"fine-tuned model on {len(test)} test images ({dev.type}, test-time augmentation: {tta})")


if __name__ == "__main__":
    run_stage(main)
