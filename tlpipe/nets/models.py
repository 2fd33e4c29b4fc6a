"""Backbone + linear head as one model, stored as safetensors plus a JSON config (no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tlpipe.io import atomic_path, load_tensors, read_json, sha256_file, write_json
from tlpipe.nets import backbones
from tlpipe.runtime import TlpipeError


class Classifier(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def linear_from(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def read_config(config: Path, stage: str) -> dict:
    try:
        cfg = read_json(config)
    except FileNotFoundError:
        raise TlpipeError(f"{config}: missing; run the {stage} stage first (dvc repro {stage})") from None
    if not isinstance(cfg, dict):
        raise TlpipeError(f"{config}: not a model config; rerun the {stage} stage")
    return cfg


def load_weights(weights: Path, config: Path, cfg: dict, stage: str) -> dict[str, torch.Tensor]:
    """The model's tensors, checked against the sha256 its config recorded and for finite values."""
    return load_tensors(weights, stage, cfg.get("sha256"), config)


def load_head(weights: Path, config: Path) -> tuple[nn.Linear, dict]:
    cfg = read_config(config, "head")
    tensors = load_weights(weights, config, cfg, "head")
    if set(tensors) != {"weight", "bias"}:
        raise TlpipeError(f"{weights}: holds {sorted(tensors)}, not a linear head's weight and bias")
    return linear_from(tensors["weight"], tensors["bias"]), cfg


def save_classifier(model: Classifier, weights: Path, config: Path, cfg: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_json(config, {**cfg, "sha256": sha256_file(weights)})  # checked by load_classifier


def load_classifier(weights: Path, config: Path) -> tuple[Classifier, dict]:
    """Rebuild a saved Classifier: its architecture from the config, its tensors from safetensors."""
    cfg = read_config(config, "finetune")
    state = load_weights(weights, config, cfg, "finetune")
    try:
        backbone = backbones.build(cfg["backbone"], pretrained=False)
        model = Classifier(backbone.trunk, nn.Linear(cfg["feature_dim"], len(cfg["classes"])))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TlpipeError(f"{weights}: does not match {config} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); rerun the finetune stage") from None
    return model.eval(), cfg

