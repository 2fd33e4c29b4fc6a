"""export_finetuned: the fine-tuned model as models/finetuned.onnx (tlpipe.export).

uint8 pixels in, class probabilities out; kept only if onnxruntime agrees with PyTorch on the test
images (metrics/export_finetuned.json). A stage of its own, so head changes do not re-export it.
"""

from tlpipe import export
from tlpipe.decoded import DecodedSplit
from tlpipe.models import load_classifier
from tlpipe.params import load_params
from tlpipe.paths import EXPORT_FINETUNED_METRICS, FINETUNED, FINETUNED_CONFIG, FINETUNED_ONNX
from tlpipe.runtime import run_stage


def main() -> None:
    load_params("export_finetuned")  # validates params.yaml; the model's config says everything else
    model, cfg = load_classifier(FINETUNED, FINETUNED_CONFIG)
    export.export(model, cfg, FINETUNED, FINETUNED_CONFIG, FINETUNED_ONNX, EXPORT_FINETUNED_METRICS,
                  DecodedSplit("test"))


if __name__ == "__main__":
    run_stage(main)
