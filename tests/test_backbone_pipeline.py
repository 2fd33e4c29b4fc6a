"""Backbones through the real pipeline (real `dvc` in temporary git repos): weights from the
Hugging Face cache offline, a repository-local weights file as a DVC dependency, missing weights,
and a probe-only backbone sweep whose features come back from DVC's cache."""

import re
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import dvc, read_json, tool_env
from test_backbones import hf_cache
from tlpipe.io import sha256_file
from tlpipe.tools.scaffold import GIT_IDENTITY

UPSTREAM = ["data", "decode", "stats"]
BELOW_FEATURES = ["features", "head", "finetune", "infer", "export_head", "export_finetuned", "evaluate"]


def set_params(repo, **changes):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def git(repo, *args):
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, env=tool_env(), check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.slow  # a real dvc repro of a timm model from the hub cache
def test_hugging_face_cache_through_dvc_repro_offline_and_missing_weights_exit_2(tmp_path, cold_copy):
    import timm

    name = "convnext_atto.d2_in1k"
    torch.manual_seed(3)
    file = hf_cache(tmp_path / "hf", name, timm.create_model(name).state_dict())
    repo = cold_copy(backbone__name=name)
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    run = dvc(repo, "repro", "head", **offline)
    assert run.executed == ["features", "head"]
    meta = read_json(repo / "data/features/meta.json")
    assert meta["backbone"] == name and meta["feature_dim"] == 320
    assert meta["weights_source"] == f"hf-hub:timm/{name}" and meta["weights_file"] == "model.safetensors"
    assert meta["weights_sha256"] == sha256_file(file)
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]  # timm's pretrained config
    head = read_json(repo / "models/head.json")
    assert {k: head[k] for k in ("weights_source", "weights_file", "weights_sha256")} == \
           {k: meta[k] for k in ("weights_source", "weights_file", "weights_sha256")}
    timing = read_json(repo / "metrics/features.json")
    assert timing["images"] == 36 and timing["ms_per_image"] > 0

    # No cache at all: one line naming the model and every place looked, exit 2, no traceback.
    proc = subprocess.run([sys.executable, "-m", "stages.features"], cwd=repo, text=True, capture_output=True,
                          env=tool_env(HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1",
                                       TORCH_HOME=str(tmp_path / "torch")))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"error: backbone {name}: no weights found; looked in: Hugging Face cache")
    assert str(tmp_path / "empty" / "hub") in errors[0] and "TLPIPE_ALLOW_DOWNLOAD=1" in errors[0]


@pytest.mark.slow  # two real pipeline runs
def test_editing_a_repository_weights_file_reruns_features_and_below_only(cold_copy):
    import timm

    def write_weights(seed):
        torch.manual_seed(seed)
        save_file(timm.create_model("convnext_atto").state_dict(), str(repo / "weights" / "mine.safetensors"))

    # the session's cold tiny project, switched to a weights file of our own
    repo = cold_copy(backbone__name="convnext_atto", backbone__weights="weights/mine.safetensors",
                     finetune__epochs=1)
    write_weights(0)
    first = dvc(repo, "repro")
    assert set(first.executed) == set(BELOW_FEATURES)
    meta = read_json(repo / "data/features/meta.json")
    assert (meta["weights_source"], meta["weights_file"]) == ("file", "weights/mine.safetensors")
    finetuned = read_json(repo / "models/finetuned.json")
    assert finetuned["weights_sha256"] == meta["weights_sha256"] == sha256_file(repo / "weights/mine.safetensors")

    write_weights(1)
    second = dvc(repo, "repro")
    assert set(second.executed) == set(BELOW_FEATURES)
    assert not set(second.executed) & set(UPSTREAM)
    assert read_json(repo / "data/features/meta.json")["weights_sha256"] == sha256_file(repo / "weights/mine.safetensors")
    assert dvc(repo, "repro").executed == []

    # inside the project but not under weights/: refused, since DVC would not watch it
    (repo / "mine.safetensors").write_bytes((repo / "weights/mine.safetensors").read_bytes())
    set_params(repo, backbone__weights="mine.safetensors")
    failed = dvc(repo, "repro", "features", check=False)
    assert failed.returncode != 0
    assert "error: backbone.weights: mine.safetensors is inside the project but not under weights/" in failed.stderr


@pytest.mark.slow  # a queued sweep of two backbones, then back to one of them
def test_probe_only_sweep_ranks_backbones_and_going_back_restores_features_from_cache(tmp_path, cold_copy):
    repo = cold_copy(finetune__epochs=0)
    assert dvc(repo, "repro").executed == ["finetune", "infer", "export_finetuned", "evaluate"]
    assert read_json(repo / "metrics/finetune.json")["epochs_run"] == 0  # the probe kept as is
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline: tf_efficientnet_lite0")
    lite0_features = (repo / "data/features/train.safetensors").read_bytes()

    # the documented sweep (docs/backbones.md)
    dvc(repo, "exp", "run", "--queue", "-S", "backbone.name=tf_efficientnet_lite1,tf_efficientnet_lite2")
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", status := dvc(repo, "queue", "status").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status

    md = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "compare", "--out", str(tmp_path / "c.html")],
                        cwd=repo, env=tool_env(), text=True, capture_output=True, check=True).stdout
    board = md.split("## Backbones, ranked by linear-probe val accuracy")[1].split("\n## ")[0]
    rows = [line for line in board.splitlines() if line.startswith("| ") and "Experiment" not in line]
    assert len(rows) == 3
    assert {n for n in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
            if any(f"| {n} |" in r for r in rows)} == {"tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                                      "tf_efficientnet_lite2"}
    val = [float(r.split("|")[4].strip(" *")) for r in rows]
    assert val == sorted(val, reverse=True)

    # back to a backbone computed in the sweep: its features come from DVC's run-cache, not a rerun
    set_params(repo, backbone__name="tf_efficientnet_lite2")
    run = dvc(repo, "repro")
    assert "features" not in run.executed
    assert "Stage 'features' is cached - skipping run, checking out outputs" in run.stdout
    assert read_json(repo / "data/features/meta.json")["backbone"] == "tf_efficientnet_lite2"
    # and to the committed one: checked out, nothing runs
    git(repo, "checkout", "-q", "--", "params.yaml")
    run = dvc(repo, "repro")
    assert "features" not in run.executed
    assert (repo / "data/features/train.safetensors").read_bytes() == lite0_features


def test_leaderboard_ranks_by_probe_val_then_test_and_only_on_the_same_data():
    from tlpipe.report.compare import Experiment, leaderboard

    def exp(name, backbone, val, test, ms, root="/data/a"):
        return Experiment(name, name, {"backbone.name": backbone, "image.img_size": 224, "data.root": root},
                          {"metrics/head.json": {"val_accuracy": val},
                           "metrics/test.json": {"head.accuracy": test, "finetuned.accuracy": test},
                           "metrics/finetune.json": {"epochs_run": 0},
                           "metrics/features.json": {"ms_per_image": ms, "device": "cpu"}})

    exps = [exp("a", "tf_efficientnet_lite0", 0.90, 0.88, 20.0), exp("b", "tf_efficientnet_lite2", 0.95, 0.90, 45.0),
            exp("c", "resnet50.a1_in1k", 0.90, 0.91, 60.0)]
    table, note = leaderboard(exps)
    assert note == "" and list(table.index) == ["b", "c", "a"]  # val, then test breaks the tie
    assert list(table["features ms/image"]) == [45.0, 60.0, 20.0]
    assert leaderboard(exps[:1])[0].empty  # one backbone: no leaderboard
    table, note = leaderboard([*exps[:2], exp("d", "convnext_atto", 0.99, 0.99, 5.0, root="/data/b")])
    assert note.startswith("not ranked: these experiments use different data")
    assert list(table.index) == ["a", "b", "d"]
