"""The whole pipeline on the real ants/bees photos with the default backbone (slow: real data)."""

import pytest

from conftest import HYMENOPTERA, dvc, needs_hymenoptera, read_json
from tlpipe.scaffold import create_project

pytestmark = [pytest.mark.slow, needs_hymenoptera()]


def test_presplit_hymenoptera_head_reaches_target(tmp_path):
    repo = create_project(tmp_path / "project", {"data.source": "presplit", "data.root": str(HYMENOPTERA)})
    dvc(repo, "repro")
    data = read_json(repo / "metrics" / "data.json")
    # No test/ folder: the given val/ (70 + 83) is the test split; val is carved out of train/.
    assert data["test_images"] == 153
    assert data["train_images"] + data["val_images"] + data["skipped"] == 245
    test = read_json(repo / "metrics" / "test.json")
    assert test["head"]["accuracy"] >= 0.93, test
