"""The probe on intermediate layers (head.layers, tlpipe.nets.layers; issue 28).

Fast: the param's checks, the auto family, the clear errors. Slow (real dvc on the tiny digit
project): the cached layers equal a direct forward of the backbone, a head.layers change reruns only
head, export_head and evaluate, the choice is deterministic, and the ONNX file and `tlpipe predict`
give the multi-layer head's probabilities.
"""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import copy_project, dvc, read_json, tool_env
from tlpipe.manifest import image_root
from tlpipe.nets import backbones, layers
from tlpipe.params import load_params
from tlpipe.runtime import TlpipeError
from tlpipe.tools.scaffold import GIT_IDENTITY


# --- fast -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("all", "must be last, auto, or a list"),
    ([], "empty list"),
    (["last", "stage3"], "'stage3' is not a layer key"),
    (["stage3@2", "stage3@2"], "names a layer twice"),
])
def test_bad_head_layers_fail_in_one_line_naming_the_param(tmp_path, value, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"head": {"layers": value}}))
    with pytest.raises(TlpipeError) as err:
        load_params("head", tmp_path / "params.yaml")
    assert "head.layers" in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (4, 4), (7, 7), (8, 5), (13, 16)])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_pool_is_adaptive_average_pooling(h, w, p):
    t = torch.randn(3, 5, h, w, generator=torch.Generator().manual_seed(h * w))
    expected = torch.nn.functional.adaptive_avg_pool2d(t, p).flatten(1)
    torch.testing.assert_close(layers.pool(t, p), expected, rtol=1e-6, atol=1e-6)


def test_auto_family_is_the_last_layer_and_the_top_stages():
    meta = {"feature_dim": 1280, "layers": {"stages": [{"module": f"blocks.{i}"} for i in range(7)]}}
    family = layers.candidates(meta)
    assert family["last"] == ["last"] and list(family)[0] == "last"
    assert family["top5@2"] == ["stage2@2", "stage3@2", "stage4@2", "stage5@2", "stage6@2"]
    assert family["last+top5@2"] == ["last", *family["top5@2"]]
    assert list(family) == ["last", "top5@2", "last+top5@2"]
    # fewer stages than five (a small timm model's feature_info): every stage
    assert layers.candidates({"feature_dim": 8, "layers": {"stages": [{}] * 3}})["top5@2"] == [
        "stage0@2", "stage1@2", "stage2@2"]
    # a backbone whose stages are not cached: auto is the last layer alone
    assert layers.candidates({"feature_dim": 512, "layers": {"stages": [], "note": "x"}}) == {"last": ["last"]}


def test_asking_for_a_layer_that_is_not_cached_names_it_and_why():
    meta = {"feature_dim": 512, "layers": {"stages": [], "dims": {}, "note": "resnet18 is a torchvision model: "
                                           "tlpipe caches only its last layer"}}
    with pytest.raises(TlpipeError, match=r"head.layers: layer\(s\) stage3@2 not in the cached features .*"
                                          r"torchvision model"):
        layers.check_keys(["last", "stage3@2"], meta, "head.layers")


def test_torchvision_backbones_cache_only_the_last_layer_and_say_so():
    modules, note = backbones.layer_modules("resnet18", torch.nn.Identity())
    assert modules == [] and "torchvision" in note


def test_lite0_stages_are_every_block_stage():
    b = backbones.build("tf_efficientnet_lite0", pretrained=False)
    modules, note = backbones.layer_modules("tf_efficientnet_lite0", b.trunk)
    assert modules == [f"blocks.{i}" for i in range(7)] and note == ""
    stages, _ = layers.describe(b.trunk, modules, 128)
    assert [s["channels"] for s in stages] == [16, 24, 40, 80, 112, 192, 320]
    assert [s["map"] for s in stages] == [[64, 64], [32, 32], [16, 16], [8, 8], [8, 8], [4, 4], [4, 4]]


def test_a_timm_model_outside_the_table_uses_its_feature_info():
    b = backbones.build("resnet18.a1_in1k", pretrained=False)
    modules, _ = backbones.layer_modules("resnet18.a1_in1k", b.trunk)
    assert modules == ["act1", "layer1", "layer2", "layer3", "layer4"]
    tapped = layers.Tapped(b.trunk, modules, ["last", "stage4@2", "stage2@1"])
    with torch.inference_mode():
        out = tapped(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 512 + 512 * 4 + 128)


# --- slow: the real pipeline on tiny images -------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, cold_project):
    # the session's cold tiny project with the head on the last layer: only the head's stages rerun
    repo = copy_project(cold_project.path, tmp_path_factory.mktemp("layers") / "project", head__layers="last")
    assert dvc(repo, "repro").executed == ["head", "export_head", "evaluate"]
    subprocess.run(["git", *GIT_IDENTITY, "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *GIT_IDENTITY, "commit", "-qm", "baseline"], cwd=repo, check=True)
    return repo


def set_layers(repo, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["head"]["layers"] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_cached_layers_equal_a_direct_forward_of_the_backbone(project):
    """Every cached layer is timm's own stage output of the decoded pixels, pooled; the last-layer
    file is exactly the trunk's output (the taps change nothing in it)."""
    import torch.nn.functional as F

    from tlpipe.ingest.decoded import DecodedSplit
    from tlpipe.ingest.images import normalize_batch

    meta = read_json(project / "data" / "features" / "meta.json")
    b = backbones.build("tf_efficientnet_lite0")
    decoded = project / "data" / "decoded"
    images, ids = DecodedSplit("test", decoded, meta=read_json(decoded / "meta.json")).rows(0, 10 ** 6)
    x = normalize_batch(images, b.mean, b.std)
    with torch.inference_mode():
        final, stages = b.trunk.forward_intermediates(x, extra_blocks=True)  # stem + the 7 block stages
        last = b.trunk.forward_head(final)
    cached = load_file(str(project / "data" / "features" / "layers-test.safetensors"))
    assert torch.equal(cached["ids"], ids)
    assert [s["module"] for s in meta["layers"]["stages"]] == [f"blocks.{i}" for i in range(7)]
    for s, stage in enumerate(stages[1:]):
        for p in (1, 2):
            torch.testing.assert_close(cached[f"stage{s}@{p}"].float(), F.adaptive_avg_pool2d(stage, p).flatten(1),
                                       rtol=1e-3, atol=1e-4)
    # (the stage runs channels_last batches, this a plain NCHW forward: float32 rounds differently,
    # within bench/features.py's 1e-4; the files hold float16, at most 2^-11 of each value off: rtol 1e-3)
    assert cached["stage0@1"].dtype == torch.float16
    torch.testing.assert_close(load_file(str(project / "data" / "features" / "test.safetensors"))["features"].float(),
                               last, rtol=1e-3, atol=1e-4)
    sizes = read_json(project / "metrics" / "features.json")
    assert sizes["layers_bytes"] > 0 and sizes["layer_keys"] == 14


@pytest.mark.slow
def test_a_head_layers_change_reruns_head_export_and_evaluate_only(project):
    before = {p.name: p.read_bytes() for p in (project / "data" / "features").iterdir()}
    set_layers(project, ["last", "stage3@2", "stage5@1"])
    assert dvc(project, "repro").executed == ["head", "export_head", "evaluate"]
    assert {p.name: p.read_bytes() for p in (project / "data" / "features").iterdir()} == before
    cfg = read_json(project / "models" / "head.json")
    assert cfg["layers"] == ["last", "stage3@2", "stage5@1"] and cfg["input_dim"] == 1280 + 80 * 4 + 192
    head = load_file(str(project / "models" / "head.safetensors"))
    assert head["weight"].shape == (3, 1280 + 80 * 4 + 192)
    metrics = read_json(project / "metrics" / "head.json")
    assert metrics["layers"] == "last+stage3@2+stage5@1" and metrics["dims"] == 1792

    # evaluate scores this head on the same layers of the test images
    test = load_file(str(project / "data" / "features" / "test.safetensors"))
    cached = load_file(str(project / "data" / "features" / "layers-test.safetensors"))
    x = torch.cat([test["features"], cached["stage3@2"], cached["stage5@1"]], 1).double()
    predicted = (x @ head["weight"].double().T + head["bias"].double()).argmax(1)
    accuracy = float((predicted == test["labels"]).double().mean())
    assert read_json(project / "metrics" / "test.json")["head"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)

    # the ONNX file takes pixels and agrees with PyTorch on the multi-layer head (the stage checks it)
    parity = read_json(project / "metrics" / "export_head.json")
    assert parity["argmax_mismatches"] == 0 and parity["max_abs_prob_diff"] <= 1e-4

    # tlpipe predict --model head and the ONNX file: evaluate's calibrated probabilities, per test image
    evaluated = pd.read_csv(project / "metrics" / "predictions" / "head.csv")
    root = image_root(project / "data" / "prepared")  # the images stay at data.root: no copy
    paths = [str(root / p) for p in evaluated["path"]]
    for model in ("head", "models/head.onnx"):
        out = project / f"predicted-{model.replace('/', '-')}.csv"
        proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.cli", "predict", *paths, "--model", model,
                               "--out", str(out), "--top-k", "1"], cwd=project, env=tool_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        got = pd.read_csv(out, keep_default_na=False)
        assert (got["error"] == "").all(), got["error"]
        assert list(got["label_1"]) == list(evaluated["predicted"]), model
        # evaluate's probabilities come from the cached features, stored as float16 (tlpipe.nets.features.stored),
        # predict's from pixels in float32: up to 1.5e-4 apart here, 1.8e-4 and 2.0e-4 on hymenoptera and
        # sign-digits (docs/sharing.md#disk); the labels above are the same
        np.testing.assert_allclose(got["prob_1"].astype(float), evaluated["confidence"], atol=5e-4)

    # back to the last layer: DVC's run-cache restores the first run's head, export and evaluation
    set_layers(project, "last")
    assert dvc(project, "repro").executed == []
    assert read_json(project / "models" / "head.json")["layers"] == ["last"]
    assert {p.name: p.read_bytes() for p in (project / "data" / "features").iterdir()} == before
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=project, check=True)


@pytest.mark.slow
def test_auto_choice_is_deterministic_and_written_down(project):
    set_layers(project, "auto")
    # the project is a copy of the cold tiny one, whose run-cache already holds an auto head
    assert dvc(project, "repro", "--no-run-cache", "head").executed == ["head"]
    metrics = read_json(project / "metrics" / "head.json")
    assert set(metrics["layer_sets"]) == {"last", "top5@2", "last+top5@2"}
    chosen = metrics["layer_sets"][metrics["layers"]]
    assert chosen["cv_log_loss"] == min(s["cv_log_loss"] for s in metrics["layer_sets"].values())
    curves = pd.read_csv(project / "metrics" / "head_layers.csv")
    assert set(curves["layers"]) == set(metrics["layer_sets"]) and curves["chosen"].sum() == 1
    assert (project / "metrics" / "head_layers.png").stat().st_size > 0
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["head"]["outs"]
    assert dvc(project, "repro", "--force", "--single-item", "head").executed == ["head"]
    assert read_json(project / "metrics" / "head.json") == metrics
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["head"]["outs"] == outs
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=project, check=True)
    dvc(project, "checkout", "-q")
