"""Backbone + linear head as one model, stored as safetensors plus a JSON config (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlpipe import backbones
from tlpipe.io import atomic_path, write_json
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


def save_classifier(model: Classifier, weights: Path, config: Path, cfg: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_json(config, cfg)


def load_classifier(weights: Path, config: Path) -> tuple[Classifier, dict]:
    """Rebuild a saved Classifier: its architecture from the config, its tensors from safetensors."""
    try:
        cfg = json.loads(config.read_text())
        state = load_file(str(weights))
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the stage that writes it first") from None
    backbone = backbones.build(cfg["backbone"], pretrained=False)
    model = Classifier(backbone.trunk, nn.Linear(cfg["feature_dim"], len(cfg["classes"])))
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg

