"""Disk (issue 31): no second copy of the images, outputs linked into DVC's cache, JPEG decoded shards.

Real `dvc` on copies of the cold tiny project (conftest). The images stay at data.root, hashed by DVC as
the data stage's dependency: a changed image must still rerun the pipeline. The workspace's outputs are
hard links into `.dvc/cache` (cache.type reflink,hardlink,copy on this ext4/overlay disk), so no stage may
write into an existing output file: every cache file must still hold the bytes its name hashes.
"""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import dvc, read_json

pytestmark = pytest.mark.slow  # real dvc runs


def cache_files(project: Path) -> list[Path]:
    return [p for p in (project / ".dvc" / "cache" / "files" / "md5").rglob("*") if p.is_file()]


def assert_cache_intact(project: Path) -> None:
    """Each cache file's md5 is its name (xx/yyyy...): nothing wrote into a linked output in place."""
    files = cache_files(project)
    assert files
    for f in files:
        name = f.parent.name + f.name.removesuffix(".dir")
        assert hashlib.md5(f.read_bytes()).hexdigest() == name, f


def test_the_cold_project_links_its_outputs_and_its_cache_is_intact(cold_project):
    project = cold_project.path
    assert "hardlink" in (project / ".dvc" / "config").read_text()
    assert not (project / "data" / "prepared" / "images").exists()  # a folder source: no copy
    linked = [p for p in (project / "data").rglob("*.safetensors")]
    assert linked and all(p.stat().st_nlink == 2 for p in linked)  # one file, two names
    meta = read_json(project / "data" / "decoded" / "meta.json")
    assert meta["codec"] == {"format": "raw"}  # the tiny projects keep exact pixels (conftest.TINY)
    assert_cache_intact(project)


def test_a_changed_image_reruns_the_pipeline(cold_copy, tmp_path, digit_folder):
    source = Path(shutil.copytree(digit_folder, tmp_path / "source"))  # the session's folder stays as it is
    project = cold_copy(data__root=str(source), image__decoded_quality=95)  # the default's JPEG shards
    assert dvc(project, "repro", "decode").executed == ["data", "decode"]  # data.root changed
    assert read_json(project / "data" / "decoded" / "meta.json")["codec"] == {"format": "jpeg", "quality": 95}
    assert dvc(project, "repro", "decode").executed == []
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv", dtype=str)
    row = int(manifest.index[manifest["split"] == "train"][0])
    rel, old = manifest.loc[row, "path"], manifest.loc[row, "sha256"]
    before = load_file(str(project / "data" / "decoded" / "train-000.safetensors"))

    pixels = np.asarray(Image.open(source / rel))
    Image.fromarray(255 - pixels).save(source / rel)  # the same file, other pixels
    status = dvc(project, "status").stdout
    assert "data:" in status and "modified:" in status and str(source) in status
    result = dvc(project, "repro", "decode")
    assert result.executed == ["data", "decode"]
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv", dtype=str)
    assert manifest.loc[row, "sha256"] == hashlib.sha256((source / rel).read_bytes()).hexdigest() != old
    after = load_file(str(project / "data" / "decoded" / "train-000.safetensors"))
    assert not torch_equal(before["jpeg"], after["jpeg"])
    # downstream stages see new inputs too
    status = yaml.safe_load(dvc(project, "status", "--json").stdout or "{}")
    assert "stats" in status and "features" in status
    assert_cache_intact(project)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
