"""The pipeline up to the linear head on the real ants/bees photos with the default backbone
(slow: real data). The fine-tuned model's numbers on this set come from bench/rerun.py."""

import pytest
from safetensors.torch import load_file

from conftest import HYMENOPTERA, dvc, needs_hymenoptera, read_json
from tlpipe import linear
from tlpipe.scaffold import create_project

pytestmark = [pytest.mark.slow, needs_hymenoptera()]


def test_presplit_hymenoptera_head_reaches_target(tmp_path):
    repo = create_project(tmp_path / "project", {
        "data.source": "presplit", "data.root": str(HYMENOPTERA),
        "image.img_size": 224, "image.resize_size": 256})
    assert dvc(repo, "repro", "head").executed == ["data", "decode", "stats", "features", "head"]
    data = read_json(repo / "metrics" / "data.json")
    # No test/ folder: the given val/ (70 + 83) is the test split; val is carved out of train/.
    assert data["test_images"] == 153
    assert data["train_images"] + data["val_images"] + data["skipped"] == 245

    test = load_file(str(repo / "data" / "features" / "test.safetensors"))
    head = load_file(str(repo / "models" / "head.safetensors"))
    proba = linear.predict_proba(test["features"], head["weight"], head["bias"])
    accuracy = float((proba.argmax(1) == test["labels"]).double().mean())
    assert accuracy >= 0.93, accuracy
