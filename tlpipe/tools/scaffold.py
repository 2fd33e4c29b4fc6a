"""Start a new tlpipe project: a git + DVC repository holding the pipeline, ready for `dvc repro`.

    python -m tlpipe.tools.scaffold DEST [--photos] [--recipe auto|near|far] [--set data.source=presplit ...]

`--photos` writes the photo settings (PHOTO_SETTINGS) with the backbone's native input geometry
(its pretraining input size, resize and interpolation: 260 px for tf_efficientnet_lite2).
`--recipe` writes a fine-tuning recipe (RECIPES; docs/finetuning.md#recommended-settings): `auto`
(the default with --photos) searches the project's own val for how much of the backbone to train
and how hard (finetune.recipe: auto); `near` (photos like ImageNet's) and `far` (images far from
them) are the two measured fixed recipes. `--set` overrides win over both.

Tests and benchmarks use it too, so they exercise exactly the pipeline a user gets.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[2]
# Hard links (one file, two names: ext4, XFS, btrfs, APFS, NTFS), else copies (a cache on another
# filesystem, FAT): DVC takes the first that works. Not "reflink" first: DVC 3 then leaves directory
# outputs (data/decoded, data/features) as copies, since a copy could be a reflink (measured: 25.6 MB
# of hymenoptera's 92.6 MB). DVC makes linked files read-only; every stage writes new files (temp +
# rename), never into an existing output (tests/test_disk.py checks every cache file's hash).
CACHE_TYPE = "hardlink,copy"
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore")
PIPELINE_DIRS = ("stages", "tlpipe")
GIT_IDENTITY = ["-c", "user.name=tlpipe", "-c", "user.email=tlpipe@localhost"]

# The settings for photos of docs/photos.md (its hymenoptera example); the defaults suit 8x8 digit scans.
# PHOTO_GEOMETRY is the default backbone's (tf_efficientnet_lite0) native geometry, written out for the
# benchmarks and tests that want it without building the model; photo_settings asks the backbone
# table (native_geometry) for any backbone's, and tests/test_backbones.py checks the two agree.
PHOTO_GEOMETRY = {"image.img_size": 224, "image.resize_size": 256}
PHOTO_AUGMENTATION = {"finetune.hflip": True, "finetune.randaugment_magnitude": 9,
                      "finetune.crop_scale_min": 0.25, "finetune.label_smoothing": 0.0}
# Fine-tuning recipes, each measured on 3 seeds against the probe (docs/finetuning.md#recommended-settings).
RECIPES = {
    # Near ImageNet (hymenoptera): the last block with the head. Unfreezing every block overfit 208
    # photos and lost to the probe; this kept or beat it.
    "near": {"finetune.unfreeze": "last_n", "finetune.unfreeze_last_n": 1, "finetune.lr": 3e-4,
             "finetune.probe_l2": 1.0, "finetune.epochs": 12, "finetune.patience": 5},
    # Far from ImageNet (sign-digits' hand photos): every block, at a larger backbone LR than the
    # default, decayed by layer so the generic low-level filters move least.
    "far": {"finetune.unfreeze": "all", "finetune.lr": 1e-3, "finetune.backbone_lr_mult": 0.3,
            "finetune.layer_decay": 0.8, "finetune.probe_l2": 0.1, "finetune.crop_scale_min": 0.35,
            "finetune.epochs": 10, "finetune.patience": 4},
    # Chosen on the project's own val (tlpipe.train.recipe_search): a budgeted search over the family
    # (last block .. every block with layer decay) sets unfreeze, lr, backbone_lr_mult, layer_decay;
    # the rest is far's, with room for a slower winner (12 epochs, patience 5).
    "auto": {"finetune.recipe": "auto", "finetune.probe_l2": 0.1, "finetune.crop_scale_min": 0.35,
             "finetune.epochs": 12, "finetune.patience": 5, "finetune.search_budget": 0.5},
}
PHOTO_SETTINGS = {**RECIPES["auto"], **PHOTO_GEOMETRY, **PHOTO_AUGMENTATION}  # the photo augmentation wins


def photo_settings(backbone: str = "tf_efficientnet_lite0", recipe: str = "auto") -> dict[str, Any]:
    """PHOTO_SETTINGS with `backbone`'s native geometry (and its name, when not the default) and `recipe`."""
    from tlpipe.nets.backbones import native_geometry

    name = {} if backbone == "tf_efficientnet_lite0" else {"backbone.name": backbone}
    return {**RECIPES[recipe], **PHOTO_AUGMENTATION, **native_geometry(backbone), **name}


def set_param(params: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def create_project(dest: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        shutil.copy2(PROJECT / name, dest / name)
    for name in PIPELINE_DIRS:
        shutil.copytree(PROJECT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "data" / "sources").mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT / "data" / "sources" / "README.md", dest / "data" / "sources" / "README.md")
    (dest / "weights").mkdir(exist_ok=True)
    shutil.copy2(PROJECT / "weights" / "README.md", dest / "weights" / "README.md")
    if overrides:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for key, value in overrides.items():
            set_param(params, key, value)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("__pycache__/\n/models/\n/data/downloads/\n/compare.html\n/lr_find/\n/dvc_plots/\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    run("git", "init", "-q", "-b", "main")
    init_dvc(dest)
    run("git", "add", "-A")
    run("git", *GIT_IDENTITY, "commit", "-qm", "new tlpipe project")
    return dest


def init_dvc(dest: Path) -> None:
    """`dvc init -q` and `dvc config cache.type`, through DVC's API: in tests, which make dozens of
    projects, two `dvc` processes per project cost more CPU than the rest of the project's set-up."""
    import logging

    from dvc.repo import Repo

    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)  # what -q does: no "Initialized DVC repository"
    try:
        with Repo.init(str(dest)) as repo, repo.config.edit() as conf:
            # the outputs in the workspace are links to DVC's cache, not a second copy (docs/sharing.md)
            conf["cache"]["type"] = CACHE_TYPE
    finally:
        log.setLevel(level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest")
    parser.add_argument("--photos", action="store_true",
                        help="settings for photos, at the backbone's native input geometry")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="a fine-tuning recipe: auto (a budgeted search on val; the default with --photos), "
                             "near (photos like ImageNet's: the last block) or far (images far from ImageNet: "
                             "every block, layer-wise LR decay)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (value parsed as YAML); applied after --photos and --recipe")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.photos:
        from tlpipe.runtime import report_errors

        report_errors(lambda: overrides.update({**photo_settings(overrides.get(
            "backbone.name", "tf_efficientnet_lite0"), args.recipe or "auto"), **overrides}))
    elif args.recipe:
        overrides = {**RECIPES[args.recipe], **overrides}
    print(create_project(args.dest, overrides))


if __name__ == "__main__":
    main()
