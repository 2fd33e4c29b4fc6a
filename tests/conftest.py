"""Shared fixtures: real images on disk, and real `dvc` in temporary git repositories."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from filelock import FileLock
from PIL import Image

from tlpipe.tools.scaffold import GIT_IDENTITY, create_project, set_param

# ../shared/datasets beside the checkout; TLPIPE_SHARED_DATASETS overrides (a worktree elsewhere)
SHARED = Path(os.environ.get("TLPIPE_SHARED_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
HYMENOPTERA = SHARED / "hymenoptera"
SIGN_DIGITS = SHARED / "sign-digits" / "images"

# Small geometry so the real backbone runs in a blink on tiny images.
TINY = {"image.img_size": 32, "image.resize_size": 36, "head.l2_steps": 4, "head.max_iter": 100,
        "finetune.epochs": 2, "finetune.batch_size": 8, "finetune.patience": 2,
        # A probe this regularized leaves fine-tuning something to improve on 18 training images,
        # so a fine-tuning param change does change the kept model.
        "finetune.probe_l2": 1.0,
        # Exact decoded pixels, so that what evaluate scores and what `tlpipe predict` decodes from the
        # files agree to 1e-4 (JPEG shards, the default, move the fine-tuned model's probabilities by up
        # to 0.026 on these 8x8 scans at 32 px); the default's JPEG path is run by the real-data tests,
        # test_decode and test_disk.
        "image.decoded_quality": 0}


def pytest_configure(config):
    """Under pytest-xdist, each worker (and every stage it starts) gets its share of the cores: two
    workers each running torch with a thread per core spin against each other (28 % more CPU time
    for the same tests, measured on two slow modules)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)


# The longest files first (measured: `make test` prints the slowest tests), so the two workers end the
# run together on short files instead of one of them running a long file alone at the end. `make test`
# passes --no-loadscope-reorder, or xdist would order files by their number of tests instead. The file
# that builds the cold project leads; the second needs none, so the other worker never waits on it.
LONGEST_FIRST = ["test_pipeline_dvc.py", "test_hymenoptera.py", "test_backbone_pipeline.py", "test_experiments.py",
                 "test_hostile.py", "test_distributed.py", "test_trust.py", "test_layers.py", "test_sharing.py",
                 "test_recipe_search.py", "test_disk.py",
                 "test_class_balance.py", "test_bench_finetune.py", "test_small_data.py", "test_finetune_resume.py",
                 "test_bench_gpu.py", "test_integrity.py", "test_fault.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test run, shared by every pytest-xdist worker.

    Each worker has its own base temp folder; their common parent is the run's, so the first
    worker to get the lock builds and the others wait, then reuse the folder."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker's failed attempt
            build(folder)
            done.touch()
    return folder


def write_digit_folder(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (0, 1, 2):
        idx = np.flatnonzero(digits.target == label)[:12]
        (root / f"class{label}").mkdir(parents=True)
        for i in idx:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / f"class{label}" / f"{i:04d}.png")


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory) -> Path:
    """Real scans: 12 of each of three digit classes as PNG files, one folder per class."""
    return built_once(tmp_path_factory, "digits3", write_digit_folder)


STAGES = ["data", "decode", "stats", "features", "head", "finetune", "infer", "export_head", "export_finetuned",
          "evaluate", "scratch"]


@pytest.fixture(scope="session")
def cold_project(tmp_path_factory, digit_folder) -> SimpleNamespace:
    """THE cold tiny project: one `dvc repro` of `tiny_params` per test run, committed as `baseline`.

    Never change it: take a copy (`copy_project`) and work on that. `executed` lists the stages the
    cold run ran, `params_read` the params each stage process read (TLPIPE_PARAMS_LOG)."""
    def build(root: Path) -> None:
        project = create_project(root / "project", tiny_params(digit_folder))
        log = root / "params-read.jsonl"
        cold = dvc(project, "repro", TLPIPE_PARAMS_LOG=str(log))
        git = lambda *args: subprocess.run(["git", *GIT_IDENTITY, *args], cwd=project, check=True,
                                           env=tool_env(), capture_output=True)
        git("add", "-A")
        git("commit", "-qm", "baseline")
        (root / "cold-run.json").write_text(json.dumps({"executed": cold.executed, "stdout": cold.stdout}))

    root = built_once(tmp_path_factory, "cold-tiny", build)
    run = read_json(root / "cold-run.json")
    return SimpleNamespace(path=root / "project", executed=run["executed"], stdout=run["stdout"],
                           params_read=[json.loads(line) for line in
                                        (root / "params-read.jsonl").read_text().splitlines()])


def copy_project(project: Path, dest: Path, **overrides) -> Path:
    """A private copy of a project: work tree, git history and DVC cache (mtimes kept; DVC rehashes
    what it needs, since its state is keyed by inode), with param overrides (`finetune__epochs=4`)."""
    dest = Path(shutil.copytree(project, dest, symlinks=True))
    if overrides:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for key, value in overrides.items():
            set_param(params, key.replace("__", "."), value)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.fixture
def cold_copy(tmp_path, cold_project):
    """`cold_copy(finetune__epochs=4)`: a copy of the cold tiny project with those params. Stages whose
    params and deps the overrides leave alone are up to date, so `dvc repro` runs only the rest: use it
    instead of `tiny_project` wherever a test needs the pipeline run up to some stage."""
    return lambda **overrides: copy_project(cold_project.path, tmp_path / "project", **overrides)


@pytest.fixture
def tiny_project(tmp_path, digit_folder):
    def make(**overrides):
        params = tiny_params(digit_folder)
        params.update({k.replace("__", "."): v for k, v in overrides.items()})
        return create_project(tmp_path / "project", params)
    return make
