"""Fine-tuning keeps the epoch with the best val loss and stops after `patience` epochs without
improvement; warmup epochs, whose rising LR usually raises val loss first, do not use up patience."""

import pytest

from conftest import dvc, read_json


@pytest.mark.parametrize("schedule, epochs_run, best_epoch", [
    ("cosine", 3, 2),   # epoch 1 is warmup: not counted; epoch 2 improves; epoch 3 uses up patience
    ("plateau", 1, 0),  # no warmup: epoch 1 uses up patience and the probe is kept
])
def test_warmup_epochs_do_not_use_up_patience(tiny_project, monkeypatch, schedule, epochs_run, best_epoch):
    repo = tiny_project(finetune__epochs=5, finetune__patience=1, finetune__warmup_epochs=1,
                        finetune__schedule=schedule)
    dvc(repo, "repro", "head")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    from stages import finetune

    # Scripted val losses for epochs 0 (the probe), 1, 2, ...; training itself runs for real.
    val_losses = iter([1.0, 1.5, 0.9, 1.0, 0.8, 0.7])
    monkeypatch.setattr(finetune, "evaluate", lambda *args: (next(val_losses), 0.5))
    finetune.main()

    result = read_json(repo / "metrics" / "finetune.json")
    assert (result["epochs_run"], result["best_epoch"]) == (epochs_run, best_epoch)
    assert result["val_loss"] == [1.0, 1.5, 0.9][best_epoch]
