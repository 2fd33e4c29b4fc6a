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


def load_head(weights: Path, config: Path) -> tuple[nn.Linear, dict]:
    try:
        tensors = load_file(str(weights))
        cfg = json.loads(config.read_text())
    except FileNotFoundError as e:
        raise TlpipeError(f"{e.filename}: missing; run the head stage first") from None
    return linear_from(tensors["weight"], tensors["bias"]), cfg


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


@torch.inference_mode()
def predict_proba(model: Classifier, cfg: dict, paths: list[Path], dev: torch.device,
                  batch_size: int, num_workers: int, progress: bool = False) -> torch.Tensor:
    """Class probabilities (N x C, float32, CPU) for images, with the model's evaluation transform."""
    from tqdm import tqdm

    from tlpipe.images import ImageFiles, eval_transform, normalize_batch

    model.to(dev, memory_format=torch.channels_last).eval()
    loader = torch.utils.data.DataLoader(ImageFiles(paths, eval_transform(**cfg["transform"])),
                                         batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    chunks = []
    for images, _ in tqdm(loader, desc="predict", disable=not progress):
        x = normalize_batch(images.to(dev, non_blocking=True), cfg["mean"], cfg["std"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        chunks.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, len(cfg["classes"]))
