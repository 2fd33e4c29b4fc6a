"""The features stage's pieces: the backbone tapped at its stages, the weights file's place, and what
the stage records (meta.json's provenance, metrics/features.json) and prints about a run."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from tlpipe import preprocessing
from tlpipe.io import sha256_file
from tlpipe.nets import backbones, layers
from tlpipe.paths import MANIFEST, WEIGHTS
from tlpipe.runtime import TlpipeError


def check_weights_path(weights: str, say: bool) -> None:
    """A weights file inside the project must be under weights/ (the folder dvc.yaml declares), so
    that changing it reruns features; one outside is only checked by its recorded sha256."""
    if not weights:
        return
    path = Path(weights).expanduser().resolve()
    root = Path.cwd().resolve()
    if path.is_relative_to(root) and not path.is_relative_to(root / WEIGHTS):
        raise TlpipeError(f"backbone.weights: {weights} is inside the project but not under {WEIGHTS}/, "
                          f"the folder dvc.yaml declares as a dependency of features; move it there")
    if not path.is_relative_to(root) and say:
        print(f"note: backbone.weights {weights} is outside the project: DVC does not watch it; its sha256 "
              "is recorded and checked downstream (after changing it: dvc repro -f features)")


def tap_layers(backbone: backbones.Backbone, img_size: int) -> tuple[layers.Tapped, dict[str, int], dict]:
    """The trunk with its stages tapped (tlpipe.nets.layers), {key: dim} of its output's parts in order,
    and the layers' record for meta.json."""
    modules, note = backbones.layer_modules(backbone.name, backbone.trunk)
    stages, note = layers.describe(backbone.trunk, modules, img_size) if modules else ([], note)
    dims = {layers.LAST: backbone.feature_dim, **layers.stage_keys(stages)}
    names = [s["module"] for s in stages]
    model = layers.Tapped(backbone.trunk, names, list(dims), layers.feature_info_channels(backbone.trunk, names))
    return model, dims, {"stages": stages, "pools": list(layers.POOLS), "dims": layers.stage_keys(stages),
                         "note": note}


def provenance(backbone: backbones.Backbone, classes: list[str], decoded: dict, normalize: str, mean, std,
               device: torch.device) -> dict:
    """What the features are features of, and what computed them (meta.json and every file's header)."""
    return {
        "backbone": backbone.name,
        "weights_source": backbone.weights_source,
        "weights_file": backbone.weights_file,
        "weights_sha256": backbone.weights_sha256,
        "feature_dim": backbone.feature_dim,
        "classes": classes,
        "preprocessing": preprocessing.record(decoded["preprocessing"], normalize, mean, std),
        "manifest_sha256": sha256_file(MANIFEST),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def run_metrics(name: str, images: int, seconds: float, device: torch.device, processes: int,
                sizes: dict[str, int], layer_meta: dict) -> dict:
    """metrics/features.json: timing lives here, not in the features, so they stay bit-identical."""
    return {"backbone": name, "images": images, "seconds": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / max(images, 1), 3),
            "device": device.type, "processes": processes,
            "last_layer_bytes": sum(v for n, v in sizes.items() if not n.startswith("layers-")),
            "layers_bytes": sum(v for n, v in sizes.items() if n.startswith("layers-")),
            "layer_keys": len(layer_meta["dims"])}


def summary_line(backbone: backbones.Backbone, images: int, seconds: float, device: torch.device,
                 layer_meta: dict) -> str:
    return (f"{images} images -> {backbone.feature_dim}-d features ({backbone.name}, weights from "
            f"{backbone.weights_source}: {backbone.weights_file}, {device.type}, "
            f"{1000 * seconds / max(images, 1):.1f} ms/image)"
            + (f", and {len(layer_meta['stages'])} stages pooled to {'/'.join(f'{p}x{p}' for p in layers.POOLS)} "
               f"({sum(layer_meta['dims'].values())} dims)" if layer_meta["stages"] else f"; last layer only "
               f"({layer_meta['note']})"))
