"""Fine-tuning keeps the epoch with the best val loss and stops after `patience` epochs without
improvement; warmup epochs, whose rising LR usually raises val loss first, do not use up patience.
On a val below the small-val threshold it keeps the schedule's last epoch and never stops early."""

import pytest
import yaml

from conftest import dvc, read_json

pytestmark = pytest.mark.slow  # fine-tuning runs of two schedules


def test_warmup_epochs_do_not_use_up_patience(cold_copy, monkeypatch):
    repo = cold_copy(finetune__epochs=4, finetune__patience=1, finetune__warmup_epochs=1)
    assert dvc(repo, "repro", "head").executed == []  # the cold project's features and head
    monkeypatch.chdir(repo)
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    from stages import finetune
    from tlpipe.ingest import audit
    from tlpipe.manifest import read_manifest
    from tlpipe.train import finetuning

    def run(schedule: str, losses=(1.0, 1.5, 0.9, 1.0, 0.8)) -> tuple[int, int, float, str]:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["finetune"]["schedule"] = schedule
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # Scripted val losses for epochs 0 (the probe), 1, 2, ...; training itself runs for real.
        val_losses = iter(losses)
        monkeypatch.setattr(finetuning, "evaluate", lambda *args: (next(val_losses), 0.5))
        finetune.main()
        result = read_json(repo / "metrics" / "finetune.json")
        return result["epochs_run"], result["best_epoch"], result["val_loss"], result["kept_by"]

    # The tiny project's val has 3 images per class: below the threshold, the schedule keeps its
    # last epoch (val loss 1.2, not epoch 2's 0.9) and runs all 4 epochs despite a patience of 1.
    assert audit.val_counts(*read_manifest())["val_min_per_class"] == 3
    assert run("cosine", (1.0, 1.5, 0.9, 1.0, 1.2)) == (4, 4, 1.2, "schedule")
    # With a threshold this val meets, val loss chooses and early stopping applies.
    monkeypatch.setattr(audit, "MIN_VAL_PER_CLASS", 3)
    # Epoch 1 is warmup and not counted; epoch 2 improves; epoch 3 uses up the patience of 1.
    assert run("cosine") == (3, 2, 0.9, "val_loss")
    # No warmup: epoch 1 uses up patience, and the probe is kept.
    assert run("plateau") == (1, 0, 1.0, "val_loss")

