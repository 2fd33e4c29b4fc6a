"""export_head: the head on its frozen pretrained backbone as models/head.onnx (tlpipe.export).

uint8 pixels in, class probabilities out; kept only if onnxruntime agrees with PyTorch on the test
images (metrics/export_head.json). A stage of its own, so fine-tuning changes do not re-export it.
"""

from safetensors.torch import load_file

from tlpipe import backbones, export
from tlpipe.decoded import DecodedSplit
from tlpipe.io import read_json
from tlpipe.models import Classifier, linear_from
from tlpipe.params import load_params
from tlpipe.paths import EXPORT_HEAD_METRICS, HEAD, HEAD_CONFIG, HEAD_ONNX
from tlpipe.runtime import run_stage


def main() -> None:
    load_params("export_head")  # validates params.yaml; the model's config says everything else
    cfg = read_json(HEAD_CONFIG)
    tensors = load_file(str(HEAD))
    backbone = backbones.pretrained_for(cfg, str(HEAD_CONFIG))
    model = Classifier(backbone.trunk, linear_from(tensors["weight"], tensors["bias"])).eval()
    export.export(model, cfg, HEAD, HEAD_CONFIG, HEAD_ONNX, EXPORT_HEAD_METRICS,
                  DecodedSplit("test"))


if __name__ == "__main__":
    run_stage(main)
