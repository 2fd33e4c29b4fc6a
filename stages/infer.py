"""infer: run the fine-tuned model once over the test images; per-image class probabilities.

A stage of its own, so that evaluate only turns predictions into metrics: a head-only change then
re-scores the head from cached features and never re-runs the fine-tuned model.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from tlpipe import backbones
from tlpipe.decoded import DecodedSplit
from tlpipe.io import atomic_path, sha256_file, write_json
from tlpipe.manifest import read_manifest
from tlpipe.models import load_classifier
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError, device, inference_batch_size, run_stage

MODEL = Path("models/finetuned.safetensors")
MODEL_CONFIG = Path("models/finetuned.json")
PREDICTIONS = Path("data/predictions/finetuned_test.safetensors")


def main() -> None:
    load_params("infer")  # validates params.yaml; inference reads no params (the model has its config)
    model, cfg = load_classifier(MODEL, MODEL_CONFIG)
    _, classes = read_manifest()
    if cfg["classes"] != classes:
        raise TlpipeError(f"{MODEL_CONFIG}: classes differ from data/prepared/classes.json; rerun finetune")
    test = DecodedSplit("test")
    if test.geometry != cfg["transform"]:
        raise TlpipeError(f"{MODEL_CONFIG}: trained at input geometry {cfg['transform']}, but "
                          f"data/decoded holds {test.geometry}; rerun finetune")
    dev = device()
    # The whole classifier through the one feature-extraction loop: its "features" are the logits.
    logits = backbones.extract_features(model, test.batches(inference_batch_size(dev)), cfg["mean"], cfg["std"],
                                        dev, desc="fine-tuned on test").reshape(len(test), len(classes))
    proba = torch.softmax(logits, dim=1)
    if not bool(torch.isfinite(proba).all()):
        raise TlpipeError(f"{MODEL}: the fine-tuned model gave non-finite outputs on the test images")
    with atomic_path(PREDICTIONS) as tmp:
        save_file({"proba": proba.contiguous(), "ids": test.ids()}, str(tmp))
    write_json(PREDICTIONS.parent / "meta.json", {"sha256": sha256_file(PREDICTIONS)})  # evaluate checks it
    print(f"fine-tuned model on {len(test)} test images ({dev.type})")


if __name__ == "__main__":
    run_stage(main)
