"""Several processes through torchrun (gloo on this CPU): the same stage commands, switched on by
TLPIPE_NPROC, giving the single-process results; a rank that dies fails the whole run cleanly."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import dvc, tool_env

pytestmark = pytest.mark.slow  # several torchrun processes over a tiny pipeline, five stage runs

VAL_LOSS = Path("metrics/finetune_curves/plots/metrics/val/loss.tsv")


def stage(repo: Path, name: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=tool_env(**env),
                          text=True, capture_output=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory, cold_project):
    """The cold tiny project (conftest) run to the head, with 12 training images and a global batch of 4."""
    from conftest import copy_project

    repo = copy_project(cold_project.path, tmp_path_factory.mktemp("ddp") / "project",
                        finetune__epochs=1, finetune__batch_size=4)
    assert dvc(repo, "repro", "head").executed == []
    return repo


def test_features_with_two_processes_are_the_same_files(project):
    # The same batches as one process (oneDNN's rounding can depend on the batch's size).
    assert stage(project, "features", TLPIPE_BATCH_SIZE="4").returncode == 0
    single = {p.name: digest(p) for p in (project / "data/features").iterdir()}
    # Batches of 4 images dealt round-robin to 2 processes.
    ran = stage(project, "features", TLPIPE_NPROC="2", TLPIPE_BATCH_SIZE="4")
    assert ran.returncode == 0, ran.stderr
    assert {p.name: digest(p) for p in (project / "data/features").iterdir()} == single
    assert ran.stdout.count("images ->") == 1  # rank 0 alone reports and writes


def test_finetune_with_two_processes_matches_one(project):
    ran = stage(project, "finetune")
    assert ran.returncode == 0, ran.stderr
    single_curve = (project / VAL_LOSS).read_text().splitlines()

    ran = stage(project, "finetune", TLPIPE_NPROC="2")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("kept epoch") == 1  # rank 0 alone writes and reports
    curve = (project / VAL_LOSS).read_text().splitlines()
    assert len(curve) == len(single_curve) == 3  # header, epoch 0, epoch 1: written once
    # Epoch 0 is the same probe on the same images, scored in two halves: equal but for the order
    # of the float64 sums. After one epoch, each step saw the same 4 images and the same mean
    # gradient (the two ranks' halves, averaged by DDP); only float32 summation order differs
    # (per-rank partial sums, then the all-reduce), a relative 1e-6 effect that three AdamW steps
    # cannot grow past 1e-4.
    for one, two in zip(single_curve[1:], curve[1:]):
        assert float(two.split()[1]) == pytest.approx(float(one.split()[1]), rel=1e-4)
    assert (project / "models/finetuned.safetensors").is_file()


def test_a_process_count_is_not_a_param_dvc_sees_the_same_stage(project):
    """The stage command and params are the same; DVC's cache entries do not depend on NPROC."""
    ran = dvc(project, "repro", TLPIPE_NPROC="2")
    assert "finetune" in ran.executed or "evaluate" in ran.executed
    status = dvc(project, "status")
    assert "Data and pipelines are up to date" in status.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["finetune"]["cmd"] == "python -m stages.finetune"


def test_a_rank_that_dies_fails_the_run_with_one_line_and_no_outputs(project):
    (project / "models/finetuned.safetensors").unlink(missing_ok=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"].update(epochs=30, patience=30)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=project,
                            env=tool_env(TLPIPE_NPROC="2"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        victim, deadline = None, time.monotonic() + 240
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            # Rank 1, once training is under way (the first epoch's checkpoint exists).
            if list((project / "models/.resume").glob("*/state.json")):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            victim = child
                    except psutil.Error:
                        pass
            time.sleep(0.05)
        assert victim is not None, "rank 1 was never seen training"
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last == ("error: stages.finetune: rank 1 of 2 failed (killed by SIGKILL); the other "
                    "processes were stopped and no outputs were written"), err[-2000:]
    assert not (project / "models/finetuned.safetensors").exists()
