"""Shared fixtures: real images on disk, and real `dvc` in temporary git repositories."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.scaffold import create_project

# ../shared/datasets beside the checkout; TLPIPE_SHARED_DATASETS overrides (a worktree elsewhere)
SHARED = Path(os.environ.get("TLPIPE_SHARED_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
HYMENOPTERA = SHARED / "hymenoptera"
SIGN_DIGITS = SHARED / "sign-digits" / "images"

# Small geometry so the real backbone runs in a blink on tiny images.
TINY = {"image.img_size": 32, "image.resize_size": 36, "head.l2_steps": 4, "head.max_iter": 100,
        "finetune.epochs": 2, "finetune.batch_size": 8, "finetune.patience": 2,
        # A probe this regularized leaves fine-tuning something to improve on 18 training images,
        # so a fine-tuning param change does change the kept model.
        "finetune.probe_l2": 1.0}


def tiny_params(image_folder: Path) -> dict:
    """Params of a tiny, fast project on a class-folder source (see the digit_folder fixture)."""
    return {**TINY, "data.source": "folder", "data.root": str(image_folder),
            "data.val_fraction": 0.25, "data.test_fraction": 0.25}


def needs_sign_digits():
    return pytest.mark.skipif(not SIGN_DIGITS.is_dir(),
                              reason=f"real dataset not available: {SIGN_DIGITS} (../shared is absent)")


def needs_hymenoptera():
    return pytest.mark.skipif(not HYMENOPTERA.is_dir(),
                              reason=f"real dataset not available: {HYMENOPTERA} (../shared is absent)")


def tool_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"TLPIPE_PROGRESS": "0", "TLPIPE_WORKERS": "0", "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"})
    env.update(extra)
    return env


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc, self.stdout, self.stderr = proc, proc.stdout, proc.stderr
        self.returncode = proc.returncode
        self.executed = re.findall(r"Running stage '(\w+)'", proc.stdout)


def dvc(repo: Path, *args: str, check: bool = True, **env) -> Result:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=tool_env(**env),
                          text=True, capture_output=True)
    if check and proc.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Result(proc)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory) -> Path:
    """Real scans: 12 of each of three digit classes as PNG files, one folder per class."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits3")
    digits = load_digits()
    for label in (0, 1, 2):
        idx = np.flatnonzero(digits.target == label)[:12]
        (root / f"class{label}").mkdir()
        for i in idx:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / f"class{label}" / f"{i:04d}.png")
    return root


@pytest.fixture
def tiny_project(tmp_path, digit_folder):
    def make(**overrides):
        params = tiny_params(digit_folder)
        params.update({k.replace("__", "."): v for k, v in overrides.items()})
        return create_project(tmp_path / "project", params)
    return make
