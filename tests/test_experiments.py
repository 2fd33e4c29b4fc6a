"""Comparing experiments (issue 4): DVC's own commands and the `tlpipe` command, through real
`dvc` in one shared temporary project with a baseline and two experiments."""

import base64
import html
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import copy_project, dvc, read_json, tool_env
from tlpipe.manifest import image_root
from tlpipe.report import compare, gallery, summary
from tlpipe.tools.scaffold import GIT_IDENTITY

CONFUSION = ["head confusion (test)", "fine-tuned confusion (test)",
             "head confusion normalized (test)", "fine-tuned confusion normalized (test)"]
CURVES = "metrics/finetune_curves/plots/metrics"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, env=tool_env(), check=True,
                          capture_output=True, text=True).stdout


def reset(repo: Path) -> None:
    """Back to the committed baseline: `dvc exp run` leaves its params and outputs in the workspace."""
    git(repo, "checkout", "-q", "--", ".")
    dvc(repo, "checkout", "-q")


def tlpipe(repo: Path, *args: str, check: bool = True, code: Path | None = None) -> subprocess.CompletedProcess:
    # `python -m` from the project root: the project's own copy of the package, as a user runs it
    # (elsewhere, `code` names the project whose package to use).
    env = tool_env(PYTHONPATH=str(code)) if code else tool_env()
    proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", *args], cwd=repo, env=env,
                          text=True, capture_output=True)
    if check and proc.returncode:
        raise AssertionError(f"tlpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, cold_project):
    """Baseline (a copy of the committed cold tiny project, conftest) + `lr-high` (finetune.lr 0.003)
    + `scratch-on` (the scratch baseline).

    Two pipeline runs: every test that uses this project (or `repo`) is marked slow."""
    repo = copy_project(cold_project.path, tmp_path_factory.mktemp("experiments") / "project")
    runs = {}
    for name, sets in {"lr-high": ["finetune.lr=0.003"], "scratch-on": ["scratch.enabled=true"]}.items():
        runs[name] = dvc(repo, "exp", "run", "-n", name, *[a for s in sets for a in ("-S", s)])
        reset(repo)
    return SimpleNamespace(path=repo, runs=runs)


@pytest.fixture
def repo(project):
    reset(project.path)
    return project.path


def exp_rows(repo: Path) -> dict[str, dict]:
    """name -> the `data` of every row of `dvc exp show --json` (the baseline under its branch name)."""
    rows = {}
    for commit in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        if commit["rev"] != "workspace":
            rows[commit["name"]] = commit["data"]
        for exp in commit.get("experiments") or []:
            rows[exp["name"]] = exp["revs"][0]["data"]
    return rows


# --- DVC's own commands ---------------------------------------------------------------------------

@pytest.mark.slow
def test_experiments_ran_what_their_params_touch(project):
    assert project.runs["lr-high"].executed == ["finetune", "infer", "export_finetuned", "evaluate"]
    assert project.runs["scratch-on"].executed == ["scratch"]


@pytest.mark.slow
def test_exp_show_has_test_metrics_of_every_model_and_the_params(repo):
    rows = exp_rows(repo)
    assert {"main", "lr-high", "scratch-on"} <= set(rows)
    for name in ("main", "lr-high", "scratch-on"):
        test = rows[name]["metrics"]["metrics/test.json"]["data"]
        for model in ("head", "finetuned"):
            assert 0 <= test[model]["accuracy"] <= 1 and 0 <= test[model]["macro_f1"] <= 1
        params = rows[name]["params"]["params.yaml"]["data"]
        assert params["backbone"]["name"] == "tf_efficientnet_lite0"
    assert rows["lr-high"]["params"]["params.yaml"]["data"]["finetune"]["lr"] == 0.003
    assert rows["main"]["metrics"]["metrics/scratch.json"]["data"] == {"scratch": {"trained": False}}
    scratch = rows["scratch-on"]["metrics"]["metrics/scratch.json"]["data"]["scratch"]
    assert scratch["trained"] is True and 0 <= scratch["accuracy"] <= 1

    table = dvc(repo, "exp", "show", "--md", "--only-changed", "--hide-workspace", "--drop", ".*/|Created").stdout
    header = table.splitlines()[0]
    for column in ("finetune.lr", "scratch.enabled", "finetuned.log_loss", "scratch.accuracy"):
        assert column in header
    for unchanged in ("data.source", "backbone.name", "head.l2_steps", "models/", "Created"):
        assert unchanged not in header
    assert "[lr-high]" in table and "[scratch-on]" in table

    # docs/experiments.md's focused view: test accuracy and macro-F1 of every model, backbone, key params
    keep = r"(head|finetuned|scratch)\.(accuracy|macro_f1)$|backbone\.name|head\.l2_steps|finetune\.(lr|epochs)$|Experiment"
    table = dvc(repo, "exp", "show", "--md", "--hide-workspace", "--drop", ".*", "--keep", keep).stdout
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:-1]] == [
        "Experiment", "head.accuracy", "head.macro_f1", "finetuned.accuracy", "finetuned.macro_f1",
        "scratch.accuracy", "scratch.macro_f1", "backbone.name", "head.l2_steps", "finetune.epochs", "finetune.lr"]

    # the README's recipe: the test accuracy of every model and the param varied
    keep = r"Experiment|(head|finetuned|scratch)\.accuracy$|finetune\.lr$"
    table = dvc(repo, "exp", "show", "--md", "--drop", ".*", "--keep", keep).stdout
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:-1]] == [
        "Experiment", "head.accuracy", "finetuned.accuracy", "scratch.accuracy", "finetune.lr"]
    assert "[lr-high]" in table and "workspace" in table


@pytest.mark.slow
def test_exp_diff_and_metrics_diff_show_deltas(repo):
    rows = exp_rows(repo)
    old = rows["scratch-on"]["metrics"]["metrics/test.json"]["data"]["finetuned"]["log_loss"]
    new = rows["lr-high"]["metrics"]["metrics/test.json"]["data"]["finetuned"]["log_loss"]
    assert old != new  # a 3x LR changes the fine-tuned model

    diff = json.loads(dvc(repo, "exp", "diff", "scratch-on", "lr-high", "--json").stdout)
    entry = diff["metrics"]["metrics/test.json"]["finetuned.log_loss"]
    assert (entry["old"], entry["new"]) == (old, new)
    assert entry["diff"] == pytest.approx(new - old)
    assert diff["params"]["params.yaml"]["finetune.lr"] == {"old": 0.001, "new": 0.003, "diff": pytest.approx(0.002)}
    assert diff["params"]["params.yaml"]["scratch.enabled"]["new"] is False

    metrics = json.loads(dvc(repo, "metrics", "diff", "scratch-on", "lr-high", "--json").stdout)
    assert metrics["metrics/test.json"]["finetuned.log_loss"]["diff"] == pytest.approx(new - old)
    # the scratch block exists only in one of them: old or new is None
    assert metrics["metrics/scratch.json"]["scratch.accuracy"]["new"] is None
    md = dvc(repo, "metrics", "diff", "scratch-on", "lr-high", "--md").stdout
    assert re.search(r"\| metrics/test.json\s+\| finetuned.log_loss\s+\|", md)


@pytest.mark.slow
def test_plots_show_renders_every_plot_including_the_galleries(repo):
    data = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    expected = ["metrics/head_grid.csv", *CONFUSION, f"{CURVES}/train/loss.tsv", f"{CURVES}/val/loss.tsv",
                f"{CURVES}/val/accuracy.tsv", "metrics/gallery/head.png", "metrics/gallery/finetuned.png"]
    for name in expected:
        assert name in data, name
    grid = data["metrics/head_grid.csv"][0]
    assert grid["type"] == "vega"
    values = grid["content"]["data"]["values"]
    # tiny grid of 4 points; the cross-validated sweep stops 3 points past its best, so maybe fewer
    assert 1 <= len(values) <= 4 and {"log10_l2", "cv_log_loss", "cv_log_loss_plus_sd"} <= set(values[0])
    for name in CONFUSION:
        values = data[name][0]["content"]["data"]["values"]
        assert len(values) == 9 and {"actual", "predicted"} <= set(values[0])  # 9 test images
    for model in ("head", "finetuned"):
        image = data[f"metrics/gallery/{model}.png"][0]
        assert image["type"] == "image"
        Image.open(image["url"]).verify()

    html = dvc(repo, "plots", "show", "-o", "plots-out").stdout
    page = (repo / "plots-out" / "index.html").read_text()
    assert "gallery" in page and "<img" in page, html


@pytest.mark.slow
def test_plots_diff_between_two_experiments(repo):
    data = json.loads(dvc(repo, "plots", "diff", "lr-high", "scratch-on", "--json").stdout)["data"]
    for name in ["metrics/head_grid.csv", f"{CURVES}/val/loss.tsv", *CONFUSION]:
        assert set(data[name][0]["revisions"]) == {"lr-high", "scratch-on"}, name
    losses = {v["rev"]: v["loss"] for v in data[f"{CURVES}/val/loss.tsv"][0]["content"]["data"]["values"]}
    assert set(losses) == {"lr-high", "scratch-on"}
    assert {image["revisions"][0] for image in data["metrics/gallery/head.png"]} == {"lr-high", "scratch-on"}


# --- the scratch baseline -------------------------------------------------------------------------

@pytest.mark.slow
def test_scratch_disabled_writes_its_metrics_without_torch(repo):
    code = ("import runpy, sys, time; t = time.perf_counter(); sys.argv = ['stages/scratch.py'];"
            "runpy.run_module('stages.scratch', run_name='__main__');"
            "print('torch' in sys.modules, time.perf_counter() - t)")
    (repo / "metrics" / "scratch.json").unlink()
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=tool_env(), text=True,
                         capture_output=True, check=True).stdout.split()
    assert out[-2] == "False"  # no torch import: that alone takes longer than the rest
    assert float(out[-1]) < 1.0
    assert read_json(repo / "metrics" / "scratch.json") == {"scratch": {"trained": False}}


@pytest.mark.slow
def test_scratch_enabled_is_reproducible(repo):
    git(repo, "checkout", "-q", exp_rev(repo, "scratch-on"), "--", "params.yaml", "metrics/scratch.json")
    before = read_json(repo / "metrics" / "scratch.json")
    assert before["scratch"]["trained"] and before["scratch"]["parameters"] > 0
    result = dvc(repo, "repro", "--force", "--single-item", "scratch")
    assert result.executed == ["scratch"]
    assert read_json(repo / "metrics" / "scratch.json") == before


def exp_rev(repo: Path, name: str) -> str:
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return git(repo, "rev-parse", ref).strip()


# --- galleries ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gallery_files_are_the_galleries_of_the_predictions(repo, tmp_path):
    for model in ("head", "finetuned"):
        png = repo / "metrics" / "gallery" / f"{model}.png"
        with Image.open(png) as img:
            assert img.format == "PNG"
        # redrawn from evaluate's predictions: the same picture, byte for byte
        predictions = repo / "metrics" / "predictions" / f"{model}.csv"
        wrong = gallery.write(predictions, tmp_path / "g.png", f"{model} model",
                              images=repo / "data" / "prepared" / "images")
        table = pd.read_csv(predictions)
        assert wrong == int((table["actual"] != table["predicted"]).sum())
        assert (tmp_path / "g.png").read_bytes() == png.read_bytes()


def test_gallery_draws_wrong_images_most_confident_first(tmp_path, digit_folder):
    images = sorted(digit_folder.rglob("*.png"))[:5]
    table = pd.DataFrame({"path": [p.relative_to(digit_folder).as_posix() for p in images],
                          "actual": ["a", "a", "b", "b", "b"], "predicted": ["a", "b", "a", "b", "a"],
                          "confidence": [0.9, 0.6, 0.8, 0.7, 0.99]})
    table.to_csv(tmp_path / "p.csv", index=False)
    assert gallery.write(tmp_path / "p.csv", tmp_path / "g.png", "m", images=digit_folder) == 3
    assert gallery.mistakes(table)["confidence"].tolist() == [0.99, 0.8, 0.6]
    assert gallery.write(tmp_path / "p.csv", tmp_path / "g1.png", "m", images=digit_folder, max_images=1) == 3
    assert (tmp_path / "g1.png").read_bytes() != (tmp_path / "g.png").read_bytes()

    table["predicted"] = table["actual"]
    table.to_csv(tmp_path / "right.csv", index=False)
    assert gallery.write(tmp_path / "right.csv", tmp_path / "none.png", "m", images=digit_folder) == 0
    Image.open(tmp_path / "none.png").verify()


# --- tlpipe compare -------------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_report_has_every_experiment_and_marks_the_best(repo, tmp_path):
    out = tmp_path / "report.html"
    md = tlpipe(repo, "compare", "--out", str(out)).stdout
    page = out.read_text()
    rows = exp_rows(repo)
    for name in ("main", "lr-high", "scratch-on"):
        assert f"<th>{name}</th>" in page and f"| {name} |" in md
        for file, entry in rows[name]["metrics"].items():
            for key, value in compare.flatten(entry["data"]).items():
                assert html.escape(compare._fmt(value)) in page, (name, file, key)  # "< 20" is "&lt; 20"

    # one data set: every experiment knows its manifest, no note, no data column
    exps = compare.load_experiments([], repo)
    assert len({e.manifest for e in exps}) == 1 and exps[0].manifest
    assert "Different data" not in md and "| data |" not in md

    # params that differ: finetune.lr and scratch.enabled, nothing else
    params_table = md.split("## Params that differ")[1].split("##")[0]
    assert params_table.splitlines()[2].split("|")[2:-1] == [" finetune.lr ", " scratch.enabled "]

    # the best fine-tuned log loss (lowest) is bold, in the row of the experiment that has it
    losses = {n: rows[n]["metrics"]["metrics/test.json"]["data"]["finetuned"]["log_loss"]
              for n in ("main", "lr-high", "scratch-on")}
    metrics_lines = md.split("## Test metrics")[1].splitlines()
    header = [c.strip() for c in next(l for l in metrics_lines if l.startswith("| Experiment")).split("|")]
    col = header.index("finetuned.log_loss")
    for line in metrics_lines:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > col and cells[1] in losses:
            is_best = losses[cells[1]] == min(losses.values())
            assert cells[col].startswith("**") == is_best, line
    assert "scratch.accuracy" in header

    # figures embedded: curves, a confusion pair per experiment, the galleries
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 + 3 + 2 * 3
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


@pytest.mark.slow
def test_compare_selected_experiments_and_errors(repo, tmp_path):
    md = tlpipe(repo, "compare", "lr-high", "main", "--out", str(tmp_path / "two.html")).stdout
    assert "# Experiments: lr-high, main" in md and "scratch-on" not in md
    bad = tlpipe(repo, "compare", "nope", "--out", str(tmp_path / "x.html"), check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: compare: no finished experiment 'nope'")


def test_confusion_is_skipped_with_a_note_when_predictions_are_unavailable(tmp_path):
    exp = compare.Experiment("ghost", "workspace", {}, {})
    image, note = compare.confusion_figure(exp, compare.Files(tmp_path))
    assert image is None and "not in the local DVC cache" in note


def test_compare_ranks_only_within_the_same_data(tmp_path):
    def exp(name, manifest, source, accuracy, log_loss, classes):
        test = {"head.accuracy": accuracy, "head.log_loss": log_loss, "finetuned.accuracy": accuracy}
        counts = {"classes": classes, "test_images": 20 * classes}
        return compare.Experiment(name, "workspace", {"seed": 0, "data.source": source, "data.root": f"/d/{name}"},
                                  {"metrics/test.json": test, "metrics/data.json": counts}, manifest=manifest)

    exps = [exp("digits-a", "m1", "digits", 0.90, 0.30, 10), exp("ants", "m2", "presplit", 0.99, 0.05, 2),
            exp("digits-b", "m1", "digits", 0.95, 0.40, 10)]
    assert compare.data_groups(exps) == [["digits-a", "digits-b"], ["ants"]]
    md = compare.report(exps, tmp_path, tmp_path / "r.html")
    note = [line for line in md.splitlines() if line.startswith("Different data:")]
    assert len(note) == 1
    assert "data 1: digits-a, digits-b (digits, 10 classes, 200 test images, seed 0)" in note[0]
    assert "data 2: ants (presplit, /d/ants, 2 classes, 40 test images, seed 0)" in note[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.split("## Test metrics")[1].splitlines() if line.startswith("| ")}
    assert rows["Experiment"][:3] == ["data", "head.accuracy", "head.log_loss"]
    # within the digits: b has the better accuracy, a the better loss; ants alone is never "best"
    assert rows["digits-a"][:3] == ["1", "0.9", "**0.3**"]
    assert rows["digits-b"][:3] == ["1", "**0.95**", "0.4"]
    assert rows["ants"][:3] == ["2", "0.99", "0.05"]
    page = (tmp_path / "r.html").read_text()
    assert "Different data: 2 data sets" in page and page.count('class="best"') == 3 + 3  # the headline, metrics/test.json

    # without manifests (DVC did not record them) the data.* params and seed decide
    for e in exps:
        e.manifest = None
    assert compare.data_groups(exps) == [["digits-a"], ["ants"], ["digits-b"]]  # data.root differs


def test_the_model_val_says_to_ship_is_a_column_and_a_line():
    v = {"images": 310, "head_accuracy": 0.961, "finetuned_accuracy": 0.906, "head_only_right": 22,
         "finetuned_only_right": 5, "p_value": 0.00151, "head_log_loss": 0.1534, "finetuned_log_loss": 0.2734,
         "log_loss_difference": 0.12, "log_loss_difference_se": 0.0392, "verdict": "finetuned worse", "ship": "head"}
    exp = compare.Experiment("tiny", "workspace", {}, {"metrics/test.json": compare.flatten({"val_comparison": v})})
    assert compare.headline([exp]).loc["tiny", "ship (by val)"] == "head"
    assert summary.ship_line(v) == (
        "on 310 val images: accuracy head 0.961 (held out) vs fine-tuned 0.906 (22 vs 5 right by one only, exact "
        "McNemar p = 0.00151), calibrated log loss 0.1534 vs 0.2734 (+0.1200 ± 0.0392): finetuned worse; ship the "
        "head (models/head.*): fine-tuning did not significantly beat it on val")
    assert "ship the fine-tuned model" in summary.ship_line({**v, "verdict": "finetuned better", "ship": "finetuned"})
    assert summary.ship_line({"images": 0, "verdict": "no val images", "ship": "head"}).startswith(
        "no val images to compare the two models on: ship the head")


def test_best_marks_direction_and_ties():
    table = pd.DataFrame({"a.accuracy": [0.5, 0.9, 0.9], "a.log_loss": [0.2, 0.1, 0.3],
                          "best_epoch": [1, 2, 3], "b.macro_f1": [0.7, 0.7, 0.7]}, index=["x", "y", "z"])
    mask = compare.best_mask(table)
    assert mask["a.accuracy"].tolist() == [False, True, True]
    assert mask["a.log_loss"].tolist() == [False, True, False]
    assert not mask["best_epoch"].any() and not mask["b.macro_f1"].any()


# --- tlpipe predict -------------------------------------------------------------------------------

def images_of(repo: Path) -> Path:
    """The folder the project's manifest paths are relative to (its data.root: no copy is made)."""
    return repo / image_root(repo / "data" / "prepared")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["head", "finetuned", "models/head.onnx", "models/finetuned.onnx"])
def test_predict_matches_evaluate_on_the_test_images(repo, tmp_path, model):
    """PyTorch or onnxruntime (the export stages' files), the same preprocessing and the same CSV."""
    expected = pd.read_csv(repo / "metrics" / "predictions" / f"{Path(model).stem}.csv", dtype={"path": str})
    images = [str(images_of(repo) / p) for p in expected["path"]]
    (tmp_path / "junk.png").write_text("not an image")
    good = (repo / images[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "preds.csv"
    proc = tlpipe(repo, "predict", "--model", model, *images, str(tmp_path / "junk.png"),
                  str(tmp_path / "truncated.png"), "--top-k", "2", "--out", str(out))
    assert f"{len(images)} images predicted with the {model} model, 2 errors" in proc.stdout
    assert "junk.png" in proc.stderr and "truncated.png" in proc.stderr

    got = pd.read_csv(out, keep_default_na=False)
    assert list(got.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    ok = got[got["error"] == ""]
    assert ok["path"].tolist() == images
    assert ok["label_1"].tolist() == expected["predicted"].tolist()
    assert ok["prob_1"].astype(float).to_numpy() == pytest.approx(expected["confidence"].to_numpy(), abs=1e-4)
    assert (ok["prob_1"].astype(float) >= ok["prob_2"].astype(float)).all()
    errors = got[got["error"] != ""]
    assert len(errors) == 2 and (errors["label_1"] == "").all()


@pytest.mark.slow
def test_predict_folder_and_errors(repo, tmp_path):
    out = tmp_path / "p.csv"
    proc = tlpipe(repo, "predict", "--model", "head", str(images_of(repo) / "class0"), "missing.png",
                  "--out", str(out))
    got = pd.read_csv(out, keep_default_na=False)
    assert len(got) == 12 + 1 and got["error"].tolist()[-1] == "no such file"
    assert "12 images predicted with the head model, 1 errors" in proc.stdout
    # outside a project: no models, one line
    bad = tlpipe(tmp_path, "predict", "--model", "head", str(images_of(repo) / "class0"),
                 "--out", str(out), check=False, code=repo)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: models/head.json")


# The minimal runtime of docs/deploy.md: onnxruntime, Pillow and numpy. Importing anything heavier
# fails in this process, and what it imported is reported after predicting.
TORCH_FREE = """
import sys
HEAVY = {"torch", "torchvision", "timm", "pandas", "safetensors", "sklearn", "dvc", "onnx", "matplotlib"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} is not part of the ONNX runtime install")

sys.meta_path.insert(0, Refuse())
from tlpipe.tools.cli import main
try:
    main(sys.argv[1:])
finally:
    print("heavy modules:", sorted({m.split(".")[0] for m in sys.modules} & HEAVY), file=sys.stderr)
"""


def predict_without_torch(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TORCH_FREE, "predict", *args], cwd=repo, env=tool_env(),
                          text=True, capture_output=True)


@pytest.mark.slow  # needs the experiments project (pipeline runs)
def test_predict_with_an_onnx_file_never_imports_torch(repo, tmp_path):
    images = [str(p) for p in sorted(images_of(repo).rglob("*.png"))]
    (tmp_path / "junk.png").write_text("not an image")
    onnx_csv, torch_csv = tmp_path / "onnx.csv", tmp_path / "torch.csv"
    # With flip test-time augmentation, so that path is covered too (without it: the test above).
    proc = predict_without_torch(repo, "--model", "models/finetuned.onnx", *images, str(tmp_path / "junk.png"),
                                 "--top-k", "3", "--tta", "--out", str(onnx_csv))
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules: []" in proc.stderr
    assert f"{len(images)} images predicted with the models/finetuned.onnx model, 1 errors" in proc.stdout
    tlpipe(repo, "predict", "--model", "finetuned", *images, str(tmp_path / "junk.png"), "--top-k", "3",
           "--tta", "--out", str(torch_csv))
    got, expected = (pd.read_csv(f, keep_default_na=False) for f in (onnx_csv, torch_csv))
    assert list(got.columns) == list(expected.columns)
    probs = [f"prob_{r}" for r in (1, 2, 3)]
    assert got.drop(columns=probs).equals(expected.drop(columns=probs))  # paths, labels, errors
    ok = got["error"] == ""
    assert got.loc[ok, probs].astype(float).to_numpy() == pytest.approx(
        expected.loc[ok, probs].astype(float).to_numpy(), abs=1e-4)


@pytest.mark.slow  # needs the experiments project (pipeline runs)
def test_a_corrupted_onnx_file_fails_in_one_line(repo, tmp_path):
    good = (repo / "models" / "finetuned.onnx").read_bytes()
    cases = {"truncated.onnx": good[: len(good) // 3], "garbage.onnx": b"\x00garbage" * 100}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        proc = predict_without_torch(repo, "--model", str(tmp_path / name), str(images_of(repo)),
                                     "--out", str(tmp_path / "p.csv"))
        assert proc.returncode == 2
        (line, modules) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {tmp_path / name}: not a loadable ONNX model")
        assert modules == "heavy modules: []" and not (tmp_path / "p.csv").exists()
    other = tlpipe(repo, "predict", "--model", "model.pt", str(images_of(repo)), check=False)
    assert other.returncode == 2 and "expected head, finetuned or a .onnx file" in other.stderr


# --- tlpipe lr-find -------------------------------------------------------------------------------

def _suggested(stdout: str) -> float:
    return float(re.search(r"suggested LR: (\S+)", stdout).group(1))


@pytest.mark.slow
def test_lr_find_head_records_the_curve_and_suggests_an_lr_in_range(repo, tmp_path):
    proc = tlpipe(repo, "lr-find", "head", "--out-dir", str(tmp_path))
    curve = pd.read_csv(tmp_path / "head.csv")
    assert list(curve.columns) == ["step", "lr", "loss", "smoothed_loss"]
    assert len(curve) >= 20 and curve["lr"].is_monotonic_increasing
    assert curve["lr"].iloc[0] == pytest.approx(1e-7)
    assert curve["loss"].iloc[0] == pytest.approx(1.0986, abs=1e-3)  # zero init: ln(3 classes)
    assert curve["smoothed_loss"].min() < 0.7 * curve["loss"].iloc[0]  # it learned something
    lr = _suggested(proc.stdout)
    assert curve["lr"].min() <= lr <= curve["lr"].max()
    assert "rule: " in proc.stdout
    Image.open(tmp_path / "head.png").verify()
    assert not (repo / "lr_find").exists()


@pytest.mark.slow  # backbone forward + backward per step, on a shared CPU
def test_lr_find_finetune(repo, tmp_path):
    proc = tlpipe(repo, "lr-find", "finetune", "--steps", "15", "--start-lr", "1e-6", "--end-lr", "1",
                  "--out-dir", str(tmp_path))
    curve = pd.read_csv(tmp_path / "finetune.csv")
    assert 5 <= len(curve) <= 15 and curve["loss"].notna().all()
    assert curve["lr"].min() <= _suggested(proc.stdout) <= curve["lr"].max()
    assert "finetune.lr" in proc.stdout


def test_lr_find_suggestion_rules():
    from tlpipe.train import lrfind
    lrs = lrfind.lr_grid(1e-6, 1, 61)
    # a loss that falls fastest around 1e-3 and blows up past 1e-1
    loss = 2 - np.tanh(2 * (np.log10(lrs) + 3)) + np.where(lrs > 0.1, 100 * (lrs - 0.1), 0)
    lr, rule = lrfind.suggest(lrs, loss)
    assert rule.startswith("steepest") and 3e-4 <= lr <= 3e-3
    lr, rule = lrfind.suggest(lrs[:20], np.linspace(1, 3, 20))  # only rises
    assert rule.startswith("no real descent") and 1e-6 <= lr <= 1e-5  # the bottom of the range
    with pytest.raises(Exception, match="start LR < end LR"):
        lrfind.lr_grid(1, 1e-3, 20)


def test_lr_find_on_a_flat_then_diverging_curve_suggests_below_the_divergence():
    """The shape that once gave 3.49e-07: noisy and flat up to ~3e-3 (fine-tuning from a good probe),
    diverging near 1e-2, the first batch's loss above the rest; 1e-3 trained well on that set."""
    from tlpipe.train import lrfind
    lrs = lrfind.lr_grid(1e-7, 10, 100)
    rng = np.random.default_rng(0)
    loss = 0.6 + 0.03 * rng.standard_normal(len(lrs)) + np.where(lrs > 3e-3, 40 * (lrs - 3e-3), 0)
    loss[0] = 0.9
    loss = loss[: int(np.argmax(loss > 4 * 0.6))]  # where the range test stops: diverged
    lr, rule = lrfind.suggest(lrs[:len(loss)], loss)
    assert rule.startswith("no real descent") and 1e-4 <= lr <= 1.5e-3, (lr, rule)


# --- a queued sweep -------------------------------------------------------------------------------

@pytest.mark.slow  # two queued experiments run by a DVC queue worker
def test_queued_sweep_reuses_cached_features(repo, tmp_path):
    dvc(repo, "exp", "run", "--queue", "-S", "head.l2_steps=3,4")
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 600
    while True:
        status = dvc(repo, "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    names = re.findall(r"^\S+\s+(\S+)\s+.*\bSuccess\b", status, flags=re.M)
    assert len(names) == 2, status
    for name in names:
        log = dvc(repo, "queue", "logs", name).stdout
        assert "Running stage 'features'" not in log
        assert "Stage 'features' didn't change, skipping" in log
    rows = exp_rows(repo)
    steps = sorted(rows[n]["params"]["params.yaml"]["data"]["head"]["l2_steps"] for n in names)
    assert steps == [3, 4]
    grids = [len(pd.read_csv(io.StringIO(git(repo, "show", f"{exp_rev(repo, n)}:metrics/head_grid.csv"))))
             for n in names]
    assert sorted(grids) == [3, 4]

    # finished queued experiments are compared like the others
    md = tlpipe(repo, "compare", "--out", str(tmp_path / "sweep.html")).stdout
    for name in names:
        assert f"| {name} |" in md
