"""The pipeline through real `dvc` in a temporary git repo on real (tiny) images."""

import hashlib
import json
import subprocess
from types import SimpleNamespace

import onnx
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import STAGES, copy_project, dvc, read_json
from tlpipe.nets.linear import PROBE_MAX_ITER
from tlpipe.tools import codedeps
from tlpipe.tools.scaffold import PROJECT



@pytest.fixture(scope="module")
def repo(tmp_path_factory, cold_project):
    """A copy of the cold tiny project (conftest), with the stages and params the cold run read.

    Every test that uses it (or `baseline`) runs the pipeline and is marked slow."""
    project = copy_project(cold_project.path, tmp_path_factory.mktemp("pipeline") / "project")
    return SimpleNamespace(path=project, cold=SimpleNamespace(executed=cold_project.executed),
                           params_read=cold_project.params_read)


@pytest.fixture
def baseline(repo):
    """Each test starts from the committed baseline: params, lock, metrics and outputs."""
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo.path, check=True)
    dvc(repo.path, "checkout", "-q")
    yield repo.path


@pytest.mark.slow
def test_cold_repro_runs_every_stage_then_nothing(repo, baseline):
    assert repo.cold.executed == STAGES
    assert "Data and pipelines are up to date" in dvc(baseline, "status").stdout
    assert dvc(baseline, "repro").executed == []


@pytest.mark.slow
def test_head_param_change_reruns_head_its_export_and_evaluate_only(baseline):
    onnx_before = (baseline / "models" / "finetuned.onnx").read_bytes()
    result = dvc(baseline, "exp", "run", "-n", "small-grid", "-S", "head.l2_steps=3")
    # Neither features nor fine-tuning, nor the fine-tuned model's inference on test images or its
    # export: the head's ONNX file only.
    assert result.executed == ["head", "export_head", "evaluate"]
    assert (baseline / "models" / "finetuned.onnx").read_bytes() == onnx_before

    # dvc exp show lists the experiment with both models' test accuracy and the params.
    rows = json.loads(dvc(baseline, "exp", "show", "--json").stdout)
    experiments = [exp for commit in rows for exp in (commit.get("experiments") or [])]
    names = [e["name"] for e in experiments]
    assert "small-grid" in names
    exp = experiments[names.index("small-grid")]["revs"][0]["data"]
    test_metrics = exp["metrics"]["metrics/test.json"]["data"]
    assert 0.0 <= test_metrics["head"]["accuracy"] <= 1.0
    assert 0.0 <= test_metrics["finetuned"]["accuracy"] <= 1.0
    assert exp["params"]["params.yaml"]["data"]["head"]["l2_steps"] == 3
    table = dvc(baseline, "exp", "show", "--md").stdout
    assert "head.accuracy" in table and "finetuned.accuracy" in table
    assert "head.l2_steps" in dvc(baseline, "exp", "show", "--md", "--only-changed").stdout


@pytest.mark.slow
def test_cv_folds_change_reruns_head_its_export_and_evaluate_only(baseline):
    before = read_json(baseline / "metrics" / "head.json")
    assert before["cv_folds"] == 5 and before["fitted_on"] == "train+val"
    result = dvc(baseline, "exp", "run", "-S", "head.cv_folds=3")
    assert result.executed == ["head", "export_head", "evaluate"]
    assert read_json(baseline / "metrics" / "head.json")["cv_folds"] == 3


@pytest.mark.slow
def test_evaluate_param_change_reruns_evaluate_only(baseline):
    result = dvc(baseline, "exp", "run", "-S", "evaluate.near_duplicate_cosine=0.9")
    assert result.executed == ["evaluate"]


@pytest.mark.slow
def test_cv_choice_is_deterministic_through_dvc(baseline):
    def head_outs():
        return yaml.safe_load((baseline / "dvc.lock").read_text())["stages"]["head"]["outs"]
    before, metrics_before = head_outs(), read_json(baseline / "metrics" / "head.json")
    assert dvc(baseline, "repro", "--force", "--single-item", "head").executed == ["head"]
    assert read_json(baseline / "metrics" / "head.json") == metrics_before
    assert head_outs() == before


@pytest.mark.slow
def test_metrics_say_how_sure_they_are(baseline):
    test = read_json(baseline / "metrics" / "test.json")
    for model in ("head", "finetuned"):
        m = test[model]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
            assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"], (model, key)
        assert m["temperature"] > 0 and 0 <= m["ece"] <= 1 and 0 <= m["ece_calibrated"] <= 1
    paired = test["paired"]
    n_test = sum(paired[k] for k in ("head_only_right", "finetuned_only_right", "both_right", "both_wrong"))
    assert n_test == 9 and paired["verdict"] in ("no significant difference", "finetuned better", "finetuned worse")
    # 3 val images per class: far below the documented minimum
    assert test["val"] == {"val_images": 9, "val_min_per_class": 3, "val_too_small": True}
    assert set(test["duplicates"]) >= {"exact_across_splits", "near_across_splits", "label_conflicts"}
    head = read_json(baseline / "metrics" / "head.json")
    assert head["cv_log_loss_calibrated"] <= head["cv_log_loss"]
    grid = pd.read_csv(baseline / "metrics" / "head_grid.csv")
    assert {"cv_log_loss", "cv_log_loss_minus_sd", "cv_log_loss_plus_sd"} <= set(grid.columns)
    assert (baseline / "metrics" / "reliability.png").stat().st_size > 0
    assert (baseline / "metrics" / "suspect_labels.png").stat().st_size > 0
    assert list(pd.read_csv(baseline / "metrics" / "suspect_labels.csv").columns) == [
        "path", "split", "given_label", "suspected_label", "given_probability", "suspected_probability"]
    calibration = read_json(baseline / "models" / "finetuned_calibration.json")
    assert calibration["val_log_loss_calibrated"] <= calibration["val_log_loss"]
    # which model to ship, judged on val alone: the fine-tuned model by the same val logits the infer
    # stage calibrated, the head by logits of models not fitted on those images; both as shipped
    v = test["val_comparison"]
    assert v["images"] == 9
    assert v["finetuned_log_loss"] == pytest.approx(calibration["val_log_loss_calibrated"], abs=2e-6)
    assert v["head_temperature"] == read_json(baseline / "models" / "head.json")["temperature"]
    assert v["log_loss_difference"] == pytest.approx(v["finetuned_log_loss"] - v["head_log_loss"], abs=2e-6)
    assert v["head_only_right"] + v["finetuned_only_right"] <= 9 and 0 < v["p_value"] <= 1
    assert v["verdict"] in ("no significant difference", "finetuned better", "finetuned worse")
    assert v["ship"] == ("finetuned" if v["verdict"] == "finetuned better" else "head")
    heldout = load_file(str(baseline / "data" / "head_heldout.safetensors"))
    assert len(heldout["ids"]) == 9 + read_json(baseline / "metrics" / "data.json")["train_images"]  # out-of-fold


@pytest.mark.slow
def test_backbone_change_reruns_features_and_below_not_data_or_stats(baseline):
    result = dvc(baseline, "exp", "run", "-S", "backbone.normalize=dataset")
    assert result.executed == ["features", "head", "finetune", "infer", "export_head", "export_finetuned",
                               "evaluate"]
    meta = read_json(baseline / "data" / "features" / "meta.json")
    stats = read_json(baseline / "data" / "stats.json")
    assert meta["preprocessing"]["normalize"] == "dataset" and meta["preprocessing"]["mean"] == stats["mean"]


@pytest.mark.slow
def test_geometry_change_reruns_stats_and_features(baseline):
    result = dvc(baseline, "exp", "run", "-S", "image.img_size=28")
    assert result.executed == ["decode", "stats", "features", "head", "finetune", "infer", "export_head",
                               "export_finetuned", "evaluate", "scratch"]


@pytest.mark.slow
def test_finetune_param_change_reruns_finetune_and_evaluate_only(baseline):
    # Also exercises the other code paths: SGD, plateau schedule, gradual unfreezing, RandAugment.
    result = dvc(baseline, "exp", "run", "-S", "finetune.optimizer=sgd", "-S", "finetune.schedule=plateau",
                 "-S", "finetune.unfreeze=gradual", "-S", "finetune.randaugment_magnitude=9",
                 "-S", "finetune.hflip=true", "-S", "finetune.train_bn_stats=true")
    assert result.executed == ["finetune", "infer", "export_finetuned", "evaluate"]
    lr = (baseline / "metrics/finetune_curves/plots/metrics/lr/head.tsv").read_text().splitlines()
    assert lr[0].split() == ["step", "head"] and len(lr) == 3  # header + 2 epochs


@pytest.mark.slow
def test_exports_agree_with_pytorch_and_name_their_source(baseline):
    """Both ONNX files: cached DVC outputs (so push/pull carry them), checked against PyTorch on every
    test image, with the classes, the preprocessing record and the source model's sha256 inside."""
    lock = yaml.safe_load((baseline / "dvc.lock").read_text())["stages"]
    classes = read_json(baseline / "data" / "prepared" / "classes.json")
    n_test = read_json(baseline / "metrics" / "data.json")["test_images"]
    for name in ("head", "finetuned"):
        out = baseline / "models" / f"{name}.onnx"
        outs = {o["path"]: o for o in lock[f"export_{name}"]["outs"]}
        md5 = outs[f"models/{name}.onnx"]["md5"]
        assert (baseline / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()

        numbers = read_json(baseline / "metrics" / f"export_{name}.json")
        assert numbers["images"] == n_test and numbers["split"] == "test"
        assert numbers["max_abs_prob_diff"] <= 1e-4 and numbers["argmax_mismatches"] == 0
        assert numbers["onnx_bytes"] == out.stat().st_size

        proto = onnx.load(str(out))
        assert proto.opset_import[0].version >= 17
        meta = {p.key: p.value for p in proto.metadata_props}
        config = read_json(baseline / "models" / f"{name}.json")
        assert json.loads(meta["classes"]) == classes == config["classes"]
        assert json.loads(meta["preprocessing"]) == config["preprocessing"]
        source = (baseline / "models" / f"{name}.safetensors").read_bytes()
        assert meta["source_sha256"] == hashlib.sha256(source).hexdigest()
        # the fitted temperature is inside (applied to the probabilities) and named in the metadata
        calibrated = config if name == "head" else read_json(baseline / "models" / "finetuned_calibration.json")
        assert float(meta["temperature"]) == numbers["temperature"] == calibrated["temperature"]


@pytest.mark.slow
def test_evaluate_change_does_not_recompute_the_finetuned_model(baseline):
    with open(baseline / "stages" / "evaluate.py", "a") as f:
        f.write("\n# an edit to evaluate only\n")
    assert dvc(baseline, "repro").executed == ["evaluate"]


@pytest.mark.slow
def test_lpft_starts_where_the_head_ended(baseline):
    """Before its first step, the fine-tuned model is the head on the frozen backbone.

    Fine-tuning fits its probe from the cached features at finetune.probe_l2 (so head params do not
    rerun it); with the head's grid narrowed to that one L2, the two are the same classifier.
    """
    # head.cv_folds=0: the classic protocol (fit on train, choose on val), as fine-tuning's probe
    result = dvc(baseline, "exp", "run", "-S", "head.l2_min_log10=-1.5", "-S", "head.l2_max_log10=-1.5",
                 "-S", "head.l2_steps=1", "-S", "head.cv_folds=0", "-S", "head.layers=last", "-S", f"head.max_iter={PROBE_MAX_ITER}", "-S", f"finetune.probe_l2={10 ** -1.5!r}")
    assert result.executed == ["head", "finetune", "infer", "export_head", "export_finetuned", "evaluate"]
    head = read_json(baseline / "metrics" / "head.json")
    finetune = read_json(baseline / "metrics" / "finetune.json")
    assert head["l2"] == pytest.approx(10 ** -1.5)
    assert finetune["initial_val_accuracy"] == pytest.approx(head["val_accuracy"], abs=1e-6)
    assert finetune["initial_val_loss"] == pytest.approx(head["val_log_loss"], abs=1e-4)
    assert 1 <= finetune["epochs_run"] <= 2


@pytest.mark.slow
def test_finetune_is_reproducible(baseline):
    def finetune_outs():
        return yaml.safe_load((baseline / "dvc.lock").read_text())["stages"]["finetune"]["outs"]
    before, metrics_before = finetune_outs(), read_json(baseline / "metrics" / "finetune.json")
    result = dvc(baseline, "repro", "--force", "--single-item", "finetune", TLPIPE_WORKERS="1")
    assert result.executed == ["finetune"]
    assert read_json(baseline / "metrics" / "finetune.json") == metrics_before
    assert finetune_outs() == before


def _leaves(params: dict, key: str) -> list[str]:
    """A declared param as the leaves DVC tracks: a whole section (`finetune`) stands for all of its."""
    node = params
    for part in key.split("."):
        node = node[part]
    if not isinstance(node, dict):
        return [key]
    return [leaf for name in node for leaf in _leaves(params, f"{key}.{name}")]


@pytest.mark.slow
def test_params_each_stage_reads_equal_params_it_declares(repo):
    params = yaml.safe_load((repo.path / "params.yaml").read_text())
    declared = {name: sorted(leaf for key in stage.get("params", []) for leaf in _leaves(params, key))
                for name, stage in yaml.safe_load((repo.path / "dvc.yaml").read_text())["stages"].items()}
    read = {entry["stage"]: entry["params"] for entry in repo.params_read}
    assert set(read) == set(STAGES)
    for stage in STAGES:
        assert read[stage] == declared[stage], stage


def test_code_deps_are_the_stage_module_and_what_it_imports():
    """Editing one module reruns exactly the stages that import it, directly or not."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        expected = set(codedeps.code_deps(name, PROJECT))  # `make deps` writes them from the same code
        code_deps = {d for d in stage["deps"] if d.endswith(".py")}
        assert code_deps == expected, name


@pytest.mark.slow
def test_features_are_bit_identical_when_recomputed(baseline):
    def feature_hashes():
        lock = yaml.safe_load((baseline / "dvc.lock").read_text())
        # metrics/features.json holds the stage's wall time, which differs by design
        return [out for out in lock["stages"]["features"]["outs"] if out["path"] == "data/features"]
    before = feature_hashes()
    assert len(before) == 1
    result = dvc(baseline, "repro", "--force", "--single-item", "features")
    assert result.executed == ["features"]
    assert feature_hashes() == before


def test_bad_param_fails_the_stage_with_one_line(tiny_project):
    repo = tiny_project(head__max_iters=10)
    result = dvc(repo, "repro", check=False)
    assert result.returncode != 0
    assert "head.max_iters: unknown key (did you mean max_iter?)" in result.stderr
    assert "Traceback" not in result.stderr
