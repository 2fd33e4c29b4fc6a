"""export_finetuned: the fine-tuned model as models/finetuned.onnx (tlpipe.deploy.export).

uint8 pixels in, calibrated class probabilities out (the temperature infer fitted on val, from
models/finetuned_calibration.json); kept only if onnxruntime agrees with PyTorch on the test images
(metrics/export_finetuned.json). A stage of its own, so head changes do not re-export it.
"""

from tlpipe.deploy import export
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.io import read_json
from tlpipe.nets.models import load_classifier
from tlpipe.params import load_params
from tlpipe.paths import (EXPORT_FINETUNED_METRICS, FINETUNED, FINETUNED_CALIBRATION, FINETUNED_CONFIG,
                          FINETUNED_ONNX)
from tlpipe.runtime import TlpipeError, run_stage


def main() -> None:
    load_params("export_finetuned")  # validates params.yaml; the model's config says everything else
    model, cfg = load_classifier(FINETUNED, FINETUNED_CONFIG)
    calibrated = read_json(FINETUNED_CALIBRATION)
    if "temperature" not in calibrated:
        raise TlpipeError(f"{FINETUNED_CALIBRATION}: no temperature; rerun the infer stage")
    export.export(model, cfg, FINETUNED, FINETUNED_CONFIG, FINETUNED_ONNX, EXPORT_FINETUNED_METRICS,
                  DecodedSplit("test"), calibrated["temperature"], str(FINETUNED_CALIBRATION),
                  calibrated.get("calibrated"), calibrated.get("calibration_reason", ""))


if __name__ == "__main__":
    run_stage(main)
