"""export_head: the head on its frozen pretrained backbone as models/head.onnx (tlpipe.deploy.export).

A head on intermediate layers (head.json's `layers`) sits on the backbone tapped at those stages
(tlpipe.nets.layers.for_head): the file still takes pixels and returns the head's probabilities.

uint8 pixels in, calibrated class probabilities out (the head's temperature, from head.json); kept
only if onnxruntime agrees with PyTorch on the test images (metrics/export_head.json). A stage of its
own, so fine-tuning changes do not re-export it.
"""

from tlpipe.deploy import export
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.nets import backbones, layers
from tlpipe.nets.models import Classifier, load_head
from tlpipe.params import load_params
from tlpipe.paths import EXPORT_HEAD_METRICS, HEAD, HEAD_CONFIG, HEAD_ONNX
from tlpipe.runtime import TlpipeError, run_stage


def main() -> None:
    load_params("export_head")  # validates params.yaml; the model's config says everything else
    head, cfg = load_head(HEAD, HEAD_CONFIG)  # checks head.safetensors against the config's sha256
    if "temperature" not in cfg:
        raise TlpipeError(f"{HEAD_CONFIG}: no temperature; rerun the head stage")
    backbone = backbones.pretrained_for(cfg, str(HEAD_CONFIG))
    model = Classifier(layers.for_head(backbone.trunk, cfg), head).eval()
    export.export(model, cfg, HEAD, HEAD_CONFIG, HEAD_ONNX, EXPORT_HEAD_METRICS, DecodedSplit("test"),
                  cfg["temperature"], str(HEAD_CONFIG), cfg.get("calibrated"), cfg.get("calibration_reason", ""))


if __name__ == "__main__":
    run_stage(main)
