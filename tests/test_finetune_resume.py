"""Fine-tuning survives `kill -9`: the next `dvc repro` resumes from the last finished epoch and
ends with exactly the result of an uninterrupted run. A non-finite loss stops it with a message
that names the epoch and step, and keeps the last good epoch's checkpoint."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import dvc, read_json, tool_env
from tlpipe.runtime import TlpipeError

pytestmark = pytest.mark.slow  # real `dvc repro` runs of fine-tuning, one of them killed

CURVE = Path("metrics/finetune_curves/plots/metrics/val/loss.tsv")


def checkpoint_epoch(repo: Path) -> int:
    """The epoch of the newest complete checkpoint under models/.resume (0: none)."""
    epochs = [read_json(p)["epoch"] for p in (repo / "models" / ".resume").glob("*/state.json")
              if not p.parent.name.startswith(".")]
    return max(epochs, default=0)


def result_of(repo: Path) -> dict:
    return {"metrics": read_json(repo / "metrics" / "finetune.json"),
            "model": hashlib.sha256((repo / "models" / "finetuned.safetensors").read_bytes()).hexdigest(),
            "curve": (repo / CURVE).read_text()}


@pytest.mark.parametrize("recipe", [
    {},
    # the EMA's state and MixUp/CutMix's draws from the global RNG must survive the kill too
    {"finetune__ema_decay": 0.9, "finetune__mixup_alpha": 0.4, "finetune__cutmix_alpha": 1.0},
], ids=["plain", "ema-mixup-cutmix"])
def test_killed_finetune_resumes_with_the_uninterrupted_result(cold_copy, recipe):
    epochs = 6
    repo = cold_copy(finetune__epochs=epochs, finetune__patience=epochs, **recipe)
    assert dvc(repo, "repro", "head").executed == []  # the cold project's features and head

    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "finetune"], cwd=repo, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(repo) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = checkpoint_epoch(repo)
    assert 2 <= killed_after < epochs, f"not killed mid-run (checkpoint epoch {killed_after})"
    # Nothing partial where a later stage could read it: outputs appear only when complete.
    assert not (repo / "models" / "finetuned.safetensors").exists()

    resumed = dvc(repo, "repro", "finetune")
    assert resumed.executed == ["finetune"]
    assert f"resuming after epoch {killed_after}" in resumed.stdout
    assert not (repo / "models" / ".resume").exists()  # removed once the outputs are written
    after_resume = result_of(repo)
    assert after_resume["metrics"]["epochs_run"] == epochs
    assert len(after_resume["curve"].splitlines()) == 1 + 1 + epochs  # header, epoch 0, epochs

    fresh = dvc(repo, "repro", "--force", "--single-item", "finetune")
    assert "resuming" not in fresh.stdout
    assert result_of(repo) == after_resume


def test_non_finite_loss_names_epoch_and_step_and_keeps_the_last_good_epoch(cold_copy, monkeypatch):
    repo = cold_copy(finetune__epochs=3, finetune__patience=3)
    assert dvc(repo, "repro", "head").executed == []  # the cold project's features and head
    (repo / "models" / "finetuned.safetensors").unlink()  # the cold run's; this run must not write one
    monkeypatch.chdir(repo)
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")

    # The fault: the training loss of epoch 2, step 1 comes out NaN (as an overflow would).
    from stages import finetune
    from tlpipe.train import finetuning
    real_cross_entropy, training_calls = finetuning.F.cross_entropy, []

    def cross_entropy(logits, target, **kwargs):
        loss = real_cross_entropy(logits, target, **kwargs)
        if "label_smoothing" in kwargs:  # the training loss; evaluation calls it without
            training_calls.append(1)
            if len(training_calls) == steps_per_epoch + 1:
                return loss * float("nan")
        return loss

    train_images = sum(1 for line in (repo / "data/prepared/manifest.csv").read_text().splitlines()
                       if line.split(",")[2] == "train")
    steps_per_epoch = train_images // 8  # finetune.batch_size in the tiny params; drop_last
    monkeypatch.setattr(finetuning.F, "cross_entropy", cross_entropy)
    with pytest.raises(TlpipeError) as err:
        finetune.main()
    message = str(err.value)
    assert message.startswith("finetune: loss is nan at epoch 2 step 1;")
    assert "the checkpoint of epoch 1 stays in models/.resume/" in message and "lower finetune.lr" in message
    assert checkpoint_epoch(repo) == 1
    assert not (repo / "models" / "finetuned.safetensors").exists()
