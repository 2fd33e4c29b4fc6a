"""Small data, told the truth (issue 29): a temperature that cannot collapse, a kept epoch that a
dozen val images do not choose, and `tlpipe summary`, which `make repro` ends with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, dvc, read_json, tool_env
from tlpipe.ingest import audit
from tlpipe.manifest import image_root, read_manifest
from tlpipe.nets import calibration
from tlpipe.report import summary
from tlpipe.tools.scaffold import create_project

ROOT = Path(__file__).resolve().parents[1]


# --- the rule, on real logits ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_logits():
    """Held-out logits of a real, weakly regularized (so overconfident) logistic regression on
    scikit-learn's 8x8 digits: 600 images to fit it, 1197 held out, 3 % to 5 % of them wrong."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    model = LogisticRegression(C=1e3, max_iter=5000).fit(x[:600], y[:600])
    return torch.from_numpy(model.decision_function(x[600:])), torch.from_numpy(y[600:])


def test_a_larger_imperfect_val_still_fits_a_temperature_that_lowers_its_log_loss(digit_logits):
    logits, y = digit_logits
    val, other = slice(0, 600), slice(600, None)
    errors = int((logits[val].argmax(1) != y[val]).sum())
    assert errors >= calibration.MIN_ERRORS
    fit = calibration.calibrate(logits[val], y[val], "val")
    assert fit.calibrated and fit.reason == f"fitted on 600 val images, {errors} misclassified"
    assert calibration.T_RANGE[0] < fit.value < calibration.T_RANGE[1] and fit.value > 1.5  # overconfident
    assert calibration.log_loss(logits[val], y[val], fit.value) < 0.8 * calibration.log_loss(logits[val], y[val])
    # and it carries over to images it was not fitted on
    assert calibration.log_loss(logits[other], y[other], fit.value) < calibration.log_loss(logits[other], y[other])
    assert fit.record() == {"temperature": round(fit.value, 6), "calibrated": True, "calibration_reason": fit.reason}


def test_a_perfectly_classified_held_out_set_keeps_t_at_1(digit_logits):
    logits, y = digit_logits
    right = torch.nonzero(logits.argmax(1) == y)[:, 0][:300]
    # the bare log-loss fit runs to the lower bound of its search: the collapse the rule prevents
    assert calibration.fit_temperature(logits[right], y[right]) == pytest.approx(calibration.T_RANGE[0], rel=1e-3)
    fit = calibration.calibrate(logits[right], y[right], "val")
    assert (fit.value, fit.calibrated) == (1.0, False)
    assert fit.reason == f"0 of 300 val images misclassified, fewer than {calibration.MIN_ERRORS}"
    assert calibration.describe(fit).startswith("not calibrated, T = 1 (0 of 300 val images")


def test_too_few_held_out_images_keep_t_at_1_whatever_their_errors(digit_logits):
    logits, y = digit_logits
    wrong = torch.nonzero(logits.argmax(1) != y)[:, 0]
    right = torch.nonzero(logits.argmax(1) == y)[:, 0]
    few = torch.cat([wrong[:calibration.MIN_ERRORS], right[:calibration.MIN_IMAGES - 1 - calibration.MIN_ERRORS]])
    fit = calibration.calibrate(logits[few], y[few], "out-of-fold")
    assert (fit.value, fit.calibrated) == (1.0, False)
    assert fit.reason == f"{calibration.MIN_IMAGES - 1} out-of-fold images, fewer than {calibration.MIN_IMAGES}"
    enough = torch.cat([few, right[-1:]])  # one image more: now it is fitted
    assert calibration.calibrate(logits[enough], y[enough], "out-of-fold").calibrated


@pytest.mark.parametrize("seed", range(10))
def test_a_fitted_temperature_stays_in_its_documented_range(seed):
    rng = np.random.default_rng(seed)
    n, c = 400, int(rng.integers(2, 10))
    y = torch.from_numpy(rng.integers(0, c, n))
    logits = torch.from_numpy(rng.normal(0, 1, (n, c)))
    logits[torch.arange(n), y] += 3.0
    logits *= float(np.exp(rng.uniform(-3, 3)))  # from far under- to far overconfident
    fit = calibration.calibrate(logits, y, "val")
    assert calibration.T_RANGE[0] <= fit.value <= calibration.T_RANGE[1]
    assert calibration.log_loss(logits, y, fit.value) <= calibration.log_loss(logits, y)


# --- tlpipe summary -------------------------------------------------------------------------------

def fake_metrics(folder: Path, reason: str | None, val_min: int, duplicates: dict) -> None:
    """metrics/*.json as the stages write them (the keys summary reads), with chosen values; the
    fine-tuned model not calibrated for `reason` (calibrated when None)."""
    scores = {"accuracy": 0.9, "accuracy_low": 0.8, "accuracy_high": 0.95, "log_loss": 0.3, "log_loss_calibrated": 0.25,
              "ece": 0.08, "ece_calibrated": 0.03, "temperature": 1.8, "calibrated": True,
              "calibration_reason": "fitted on 245 out-of-fold images, 11 misclassified"}
    not_calibrated = {"temperature": 1.0, "calibrated": False, "calibration_reason": reason} if reason else {}
    test = {"head": scores, "finetuned": {**scores, **not_calibrated, "accuracy": 0.925},
            "paired": {"head_only_right": 2, "finetuned_only_right": 7, "both_right": 150, "both_wrong": 1,
                       "p_value": 0.18, "significant": False, "verdict": "no significant difference"},
            "val": {"val_images": 2 * val_min, "val_min_per_class": val_min, "val_too_small": val_min < 20},
            "duplicates": {"exact_across_splits": 0, "near_across_splits": 0, "across_train_test": 0,
                           "across_train_val": 0, "across_test_val": 0, "label_conflicts": 0, **duplicates}}
    (folder / "metrics").mkdir(parents=True)
    (folder / "metrics" / "test.json").write_text(json.dumps(test))
    (folder / "metrics" / "finetune.json").write_text(json.dumps(
        {"best_epoch": 12, "epochs_run": 12, "kept_weights": "raw", "kept_by": "schedule"}))


def test_summary_says_what_matters_in_lines_under_120_characters(tmp_path, monkeypatch):
    long_reason = "a reason far longer than any line " * 6
    fake_metrics(tmp_path, long_reason.strip(), 6, {"near_across_splits": 2, "across_train_test": 2})
    monkeypatch.chdir(tmp_path)
    text = summary.render()
    lines = text.splitlines()
    assert max(len(line) for line in lines) < 120
    assert lines[0] == "on the test split: 160 images; 95 % intervals in brackets"  # no metrics/data.json: no sizes
    assert lines[1] == ("head        accuracy 0.900 [0.800, 0.950]; temperature 1.80: log loss 0.300 -> 0.250, "
                        "ECE 0.080 -> 0.030")
    assert lines[2].startswith("fine-tuned  accuracy 0.925 [0.800, 0.950]; log loss 0.300, ECE 0.080; not "
                               "calibrated (T = 1): a reason")
    flat = " ".join(text.split())  # wrapped lines, joined: nothing of the long reason is lost
    assert long_reason.strip() in flat
    assert ("head vs fine-tuned: no significant difference (exact McNemar p = 0.18; 2 vs 7 test images right by one "
            "model only)") in flat
    assert "fine-tuned model: epoch 12 of 12 (raw weights), kept by schedule" in flat
    assert audit.val_warning({"val_min_per_class": 6}) in flat
    assert "2 image pair(s) copied across splits (2 train/test); test is involved" in flat
    assert "metrics/reliability.png" in flat and "dvc plots show" in flat and "tlpipe compare" in flat


def test_summary_without_warnings_and_without_a_run(tmp_path, monkeypatch):
    fake_metrics(tmp_path / "ok", None, 31, {})
    monkeypatch.chdir(tmp_path / "ok")
    text = summary.render()
    assert "warning" not in text and "not calibrated" not in text
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "summary"], cwd=tmp_path, env=tool_env(PYTHONPATH=str(ROOT)),
                          text=True, capture_output=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: metrics/test.json: missing; run `dvc repro` first"


def test_make_repro_ends_with_the_summary():
    recipe = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "repro", f"VENV={Path(sys.executable).parents[1]}"],
                            cwd=ROOT, text=True, capture_output=True, check=True,
                            # under `make test`, a nested make would print "Entering directory" lines
                            env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
                            ).stdout.split("\n")
    commands = [line for line in recipe if line.strip()]
    assert commands[-3:] == ["dvc repro", "echo", "tlpipe summary"], commands


# --- a perfectly classified val of 6 images per class, through dvc repro -------------------------------

def two_shapes(root: Path, per_class: int = 24) -> Path:
    """Two classes no backbone confuses: a bright disk on black, and coloured horizontal stripes."""
    rng = np.random.default_rng(29)
    yy, xx = np.mgrid[:40, :40]
    for name in ("disk", "stripes"):
        (root / name).mkdir(parents=True)
    for i in range(per_class):
        cy, cx, r = rng.integers(14, 26), rng.integers(14, 26), rng.integers(8, 13)
        disk = np.zeros((40, 40, 3)) + rng.integers(0, 40)
        disk[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(180, 256, 3)
        period = int(rng.integers(4, 9))
        colours = rng.integers(0, 256, (2, 3))
        stripes = np.where(((yy + int(rng.integers(0, period))) // (period // 2) % 2 == 0)[..., None], *colours)
        for name, pixels in (("disk", disk), ("stripes", stripes)):
            noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy, "RGB").save(root / name / f"{name}{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def small_project(tmp_path_factory):
    base = tmp_path_factory.mktemp("two_shapes")
    project = create_project(base / "project", {
        **TINY, "data.source": "folder", "data.root": str(two_shapes(base / "images")),
        "data.val_fraction": 0.25, "data.test_fraction": 0.25, "finetune.epochs": 3, "finetune.patience": 1})
    return project, dvc(project, "repro")


@pytest.mark.slow
def test_a_perfectly_classified_tiny_val_keeps_t_at_1_and_the_last_epoch(small_project):
    repo, run = small_project
    assert read_json(repo / "metrics" / "data.json")["val_images"] == 12
    val = load_file(str(repo / "data" / "predictions" / "finetuned_val.safetensors"))
    manifest, _ = read_manifest(repo / "data" / "prepared")
    labels = torch.tensor(manifest.loc[val["ids"].numpy(), "target"].to_numpy())
    assert torch.equal(val["logits"].argmax(1), labels)  # every val image right: the case
    assert calibration.fit_temperature(val["logits"], labels) < 0.26  # what an unguarded fit would ship

    # T = 1 and why, wherever the temperature is recorded or printed
    fine = read_json(repo / "models" / "finetuned_calibration.json")
    assert (fine["temperature"], fine["calibrated"]) == (1.0, False)
    assert fine["calibration_reason"] == "12 val images, fewer than 50"
    assert fine["val_log_loss_calibrated"] == fine["val_log_loss"]
    head = read_json(repo / "models" / "head.json")
    assert (head["temperature"], head["calibrated"]) == (1.0, False)
    assert head["calibration_reason"] == "36 out-of-fold images, fewer than 50"
    assert {k: read_json(repo / "metrics" / "head.json")[k] for k in ("temperature", "calibrated", "calibration_reason")} \
        == {k: head[k] for k in ("temperature", "calibrated", "calibration_reason")}
    test = read_json(repo / "metrics" / "test.json")
    for name, fit in (("head", head), ("finetuned", fine)):
        assert test[name]["temperature"] == 1.0 and test[name]["calibrated"] is False
        assert test[name]["calibration_reason"] == fit["calibration_reason"]
        assert test[name]["log_loss_calibrated"] == pytest.approx(test[name]["log_loss"], abs=1e-6)
    assert "not calibrated, T = 1 (12 val images, fewer than 50)" in run.stdout
    assert "not calibrated, T = 1 (36 out-of-fold images, fewer than 50)" in run.stdout
    assert "(not calibrated: 12 val images, fewer than 50)" in run.stdout

    # the kept epoch: the schedule's last, no early stopping, and it says so
    metrics = read_json(repo / "metrics" / "finetune.json")
    assert (metrics["kept_by"], metrics["best_epoch"], metrics["epochs_run"], metrics["kept_weights"]) == (
        "schedule", 3, 3, "raw")
    assert metrics["kept_reason"].startswith("val has 6 image(s) in its smallest class (< 20), too few to choose")
    model = read_json(repo / "models" / "finetuned.json")
    assert (model["kept_by"], model["kept_reason"], model["best_epoch"]) == ("schedule", metrics["kept_reason"], 3)
    assert f"kept by schedule: {metrics['kept_reason']}" in run.stdout
    assert "kept epoch 3 (raw weights) by schedule" in run.stdout and "early stop:" not in run.stdout
    assert audit.val_warning(test["val"]) in run.stdout


@pytest.mark.slow
def test_predict_and_the_onnx_file_apply_the_same_t_of_1(small_project, tmp_path):
    repo, _ = small_project
    for name, fit in (("head", read_json(repo / "models" / "head.json")),
                      ("finetuned", read_json(repo / "models" / "finetuned_calibration.json"))):
        meta = {p.key: p.value for p in onnx.load(str(repo / "models" / f"{name}.onnx")).metadata_props}
        assert (meta["temperature"], meta["calibrated"]) == ("1.0", "false")
        assert meta["calibration_reason"] == fit["calibration_reason"]

    test = load_file(str(repo / "data" / "predictions" / "finetuned_test.safetensors"))
    manifest = pd.read_csv(repo / "data" / "prepared" / "manifest.csv")
    root = repo / image_root(repo / "data" / "prepared")
    images = [str(root / p) for p in manifest.loc[test["ids"].numpy(), "path"]]
    as_trained = test["proba"].double().numpy()  # softmax of the logits: T = 1
    for model in ("finetuned", "models/finetuned.onnx"):
        out = tmp_path / f"{Path(model).stem}.csv"
        proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "predict", "--model", model, *images, "--top-k", "2",
                               "--out", str(out)], cwd=repo, env=tool_env(), text=True, capture_output=True, check=True)
        assert (f"note: the {model} model's probabilities are not calibrated (T = 1: 12 val images, fewer than 50"
                in proc.stderr), proc.stderr
        got = pd.read_csv(out)
        classes = read_json(repo / "data" / "prepared" / "classes.json")
        proba = np.zeros_like(as_trained)
        for rank in (1, 2):
            proba[np.arange(len(got)), [classes.index(c) for c in got[f"label_{rank}"]]] = got[f"prob_{rank}"]
        assert proba == pytest.approx(as_trained, abs=1e-4), model


@pytest.mark.slow
def test_summary_of_the_small_project(small_project):
    repo, _ = small_project
    proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "summary"], cwd=repo, env=tool_env(), text=True,
                          capture_output=True, check=True)
    lines = proc.stdout.splitlines()
    assert 6 <= len(lines) <= 14 and max(len(line) for line in lines) < 120, proc.stdout
    test = read_json(repo / "metrics" / "test.json")
    assert lines[0] == "on the test split: 12 images (24 train, 12 val, 2 classes); 95 % intervals in brackets"
    flat = " ".join(proc.stdout.split())
    for model, label, held_out in (("head", "head", "36 out-of-fold"), ("finetuned", "fine-tuned", "12 val")):
        m = test[model]
        assert (f"{label} accuracy {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}]; log loss "
                f"{m['log_loss']:.3f}, ECE {m['ece']:.3f}; not calibrated (T = 1): {held_out} images, fewer than 50"
                ) in flat
    assert f"head vs fine-tuned: {test['paired']['verdict']} (exact McNemar p = " in flat
    assert "fine-tuned model: epoch 3 of 3 (raw weights), kept by schedule" in flat
    assert audit.val_warning(test["val"]) in flat
