"""The backbone's intermediate layers as features for the head (Head2Toe, Evci et al. ICML 2022).

The last pooled layer of an ImageNet backbone is what ImageNet's classes needed; on images far from
ImageNet (hand signs, scans) an earlier stage often separates the classes better. The features
stage therefore also caches, in the same forward pass, every stage's output (tlpipe.nets.backbones.
layer_modules) average-pooled to 1x1 and to 2x2 cells (POOLS), one tensor per layer key
("stage3@2": stage 3, pooled to 2x2, flattened channel-major), in `layers-{split}.safetensors`
beside the last-layer files, which stay as they were; stored as float16 like them
(tlpipe.nets.features.stored), read back as float32. The head (head.layers) reads any subset by
key; "last" names the last-layer features. A model on several layers is the same Linear on the
concatenation, in the order of its keys, of what `Tapped` computes from pixels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tlpipe.io import atomic_path, check_finite, verify_sha256
from tlpipe.nets.features import loaded, stored
from tlpipe.runtime import TlpipeError

LAST = "last"
POOLS = (1, 2)  # 4x4 cells cost 4x the 2x2 dims and bought nothing measurable (docs/layers.md)
KEY = re.compile(r"stage(\d+)@(\d+)")


def key(stage: int, pool: int) -> str:
    return f"stage{stage}@{pool}"


def parse(k: str) -> tuple[int, int]:
    m = KEY.fullmatch(k)
    if not m:
        raise TlpipeError(f"head.layers: {k!r} is not a layer key (last, or stageN@P such as stage3@2)")
    return int(m[1]), int(m[2])


def file_name(split: str) -> str:
    return f"layers-{split}.safetensors"


def _as_map(out, channels: int | None) -> torch.Tensor:
    """A hooked module's output as an N x C x H x W map (timm's NHWC stages turned NCHW)."""
    t = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(t, torch.Tensor) and t.ndim == 4 and channels and t.shape[1] != channels and t.shape[-1] == channels:
        t = t.permute(0, 3, 1, 2)
    return t


def pool(t: torch.Tensor, p: int) -> torch.Tensor:
    """adaptive_avg_pool2d(t, p).flatten(1), written as means over its bins (the same bins, the same
    channel-major layout): the ONNX exporter takes adaptive pooling only where p divides the map,
    and a 224 px Lite0's last stages are 7 x 7."""
    if p == 1:
        return t.mean((2, 3))
    h, w = int(t.shape[2]), int(t.shape[3])
    rows = [(i * h // p, -(-(i + 1) * h // p)) for i in range(p)]
    cols = [(j * w // p, -(-(j + 1) * w // p)) for j in range(p)]
    return torch.stack([t[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in cols], 2).flatten(1)


class Tapped(nn.Module):
    """The trunk and, from the same forward pass, pooled outputs of its stages: concatenated in the
    order of `keys` ("last" is the trunk's own output). The trunk's computation is untouched (forward
    hooks only read), so its part is exactly trunk(x)."""

    def __init__(self, trunk: nn.Module, modules: list[str], keys: list[str], channels: list[int] | None = None):
        super().__init__()
        self.trunk, self.keys = trunk, list(keys)
        self._parsed = [None if k == LAST else parse(k) for k in self.keys]
        self._seen: dict[int, torch.Tensor] = {}
        for stage in sorted({p[0] for p in self._parsed if p is not None}):
            if stage >= len(modules):
                raise TlpipeError(f"layer stage{stage}: the backbone has {len(modules)} stages (0-{len(modules) - 1})")
            chs = channels[stage] if channels else None
            trunk.get_submodule(modules[stage]).register_forward_hook(
                lambda _m, _i, out, s=stage, c=chs: self._seen.__setitem__(s, _as_map(out, c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.clear()
        last = self.trunk(x)
        parts = [last if p is None else pool(self._seen[p[0]], p[1]) for p in self._parsed]
        self._seen.clear()
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def feature_info_channels(trunk: nn.Module, modules: list[str]) -> list[int] | None:
    info = getattr(trunk, "feature_info", None)
    if not isinstance(info, list):
        return None
    by_module = {i.get("module"): i.get("num_chs") for i in info}
    chs = [by_module.get(m) for m in modules]
    return chs if all(chs) else None


@torch.inference_mode()
def describe(trunk: nn.Module, modules: list[str], img_size: int) -> tuple[list[dict], str]:
    """Each stage's module, channels and map size at `img_size` (one forward pass of zeros); ([], why)
    when a stage's output is not a spatial map (e.g. a ViT's tokens)."""
    if not modules:
        return [], ""
    channels = feature_info_channels(trunk, modules)
    seen, handles = {}, []
    for i, name in enumerate(modules):
        chs = channels[i] if channels else None
        handles.append(trunk.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, i=i, c=chs: seen.__setitem__(i, _as_map(out, c))))
    try:
        trunk(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
    stages = []
    for i, name in enumerate(modules):
        t = seen.get(i)
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            return [], f"stage {name}'s output is not an N x C x H x W map: tlpipe caches only the last layer"
        stages.append({"module": name, "channels": int(t.shape[1]), "map": [int(t.shape[2]), int(t.shape[3])]})
    return stages, ""


def stage_keys(stages: list[dict]) -> dict[str, int]:
    """Every cached layer key and its dimension, input to output."""
    return {key(s, p): st["channels"] * p * p for s, st in enumerate(stages) for p in POOLS}


def save(folder: Path, split: str, tensors: dict[str, torch.Tensor], ids: torch.Tensor, meta: dict) -> None:
    with atomic_path(folder / file_name(split)) as tmp:
        save_file({**{k: stored(v) for k, v in tensors.items()}, "ids": ids.contiguous()}, str(tmp),
                  metadata={"tlpipe": json.dumps(meta, sort_keys=True)})


# --- reading, as the head, evaluate and bench read them ---------------------------------------------

def available(meta: dict) -> dict[str, int]:
    """{key: dim} of every layer the features folder holds, "last" first."""
    return {LAST: meta["feature_dim"], **(meta.get("layers") or {}).get("dims", {})}


def check_keys(keys: list[str], meta: dict, where: str) -> None:
    have = available(meta)
    missing = [k for k in keys if k not in have]
    if missing:
        why = (meta.get("layers") or {}).get("note") or ""
        raise TlpipeError(f"{where}: layer(s) {', '.join(missing)} not in the cached features (they hold "
                          f"{', '.join(have) if len(have) < 8 else ', '.join(list(have)[:7]) + ', ...'})"
                          + (f"; {why}" if why else "; rerun the features stage"))


def read(split: str, keys: list[str], last: dict, meta: dict, folder: Path) -> dict[str, torch.Tensor]:
    """{key: N x dim} of `keys` for one split; `last` is the split's load_split tensors, whose ids the
    layers file must match (same rows, same order). A model reads torch.cat of them in its keys' order."""
    parts = {LAST: loaded(last["features"])} if LAST in keys else {}
    wanted = [k for k in keys if k != LAST]
    if wanted:
        path = folder / file_name(split)
        verify_sha256(path, meta.get("files", {}).get(path.name), folder / "meta.json", "features")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise TlpipeError(f"{path}: unreadable layer features ({e}); rerun the features stage") from None
        check_finite(path, tensors)
        if not torch.equal(tensors.get("ids", torch.empty(0)), last["ids"]):
            raise TlpipeError(f"{path}: not the rows of {split}.safetensors; rerun the features stage")
        dims = available(meta)
        for k in wanted:
            if k not in tensors or tensors[k].shape != (len(last["ids"]), dims[k]):
                raise TlpipeError(f"{path}: no {k} of {dims[k]} dims per image; rerun the features stage")
            parts[k] = loaded(tensors[k])
    return parts


def concat(parts: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([parts[k] for k in keys], 1) if len(keys) > 1 else parts[keys[0]]


def of_model(cfg: dict) -> list[str]:
    """The layer keys a head config reads (configs from before layers existed: the last layer)."""
    return list(cfg.get("layers", [LAST]))


def for_head(trunk: nn.Module, cfg: dict) -> nn.Module:
    """pixels -> exactly the features the head of `cfg` reads, in its order: the trunk itself for a
    last-layer head, else the trunk tapped at the stages head.json names."""
    keys = of_model(cfg)
    if keys == [LAST]:
        return trunk
    modules = cfg.get("layer_modules") or []
    return Tapped(trunk, modules, keys, feature_info_channels(trunk, modules))


# --- the subsets head.layers: auto tries ------------------------------------------------------------

def candidates(meta: dict) -> dict[str, list[str]]:
    """head.layers: auto's family, in a fixed order (a tie in CV log loss keeps the earlier, smaller):
    the last layer; the last five stages pooled to 2x2 (for Lite0 stages 2-6, 2,976 dims: the set
    whose CV log loss was lowest on sign-digits, docs/layers.md); the same with the last layer (the
    better one on ImageNet-like photos in Head2Toe's and issue 28's checks). For a backbone whose
    intermediate layers are not cached, only the last layer."""
    n = len((meta.get("layers") or {}).get("stages", []))
    if n == 0:
        return {LAST: [LAST]}
    top = [key(s, 2) for s in range(max(0, n - TOP), n)]
    return {LAST: [LAST], f"top{TOP}@2": top, f"last+top{TOP}@2": [LAST, *top]}


TOP = 5  # stages in auto's sets, counted from the last
