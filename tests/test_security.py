"""No unsafe deserialization in the source; no param or CSV value reads or writes outside its root."""

import ast
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import data
from tlpipe.ingest import sources
from tlpipe.runtime import TlpipeError

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("tlpipe", "stages", "bench", "tests") for p in (PROJECT / d).rglob("*.py"))


def calls(tree: ast.AST, dotted: str):
    """Calls whose function is written `dotted` (e.g. torch.load)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            yield node


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_torch_load_passes_weights_only_true():
    found = 0
    for path in SOURCES:
        text = path.read_text()
        tree = ast.parse(text)
        loaders = list(calls(tree, "torch.load")) + list(calls(tree, "torch.hub.load_state_dict_from_url"))
        for call in loaders:
            assert keyword(call, "weights_only") is True, f"{path}:{call.lineno} without weights_only=True"
        # Every mention of torch.load is such a call: no alias (`f = torch.load`), no `from torch import load`.
        mentions = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and ast.unparse(n) == "torch.load"]
        assert len(mentions) == len(list(calls(tree, "torch.load"))), f"{path}: torch.load used indirectly"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in [a.name for a in node.names], f"{path}:{node.lineno}"
        if path.name != "test_security.py":  # the plain-text view agrees with the AST's
            assert text.count("torch.load(") == len(list(calls(tree, "torch.load"))), path
        found += len(loaders)
    assert found >= 4  # the backbones' loaders and a test's: the scan is looking at the right code


def test_no_pickle_or_unsafe_yaml_or_numpy_pickles():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "dill", "joblib"} & set(names), f"{path}:{node.lineno}"
        for call in calls(tree, "yaml.load"):
            raise AssertionError(f"{path}:{call.lineno}: yaml.load (use yaml.safe_load)")
        for call in list(calls(tree, "np.load")) + list(calls(tree, "numpy.load")):
            assert keyword(call, "allow_pickle") in (None, False), f"{path}:{call.lineno}"


def test_path_params_cannot_leave_their_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for csv_file in ("../x.csv", "/etc/passwd", "a/../../x.csv"):
        with pytest.raises(TlpipeError, match="data.csv_file"):
            sources.from_csv(root, csv_file, "file", "label")
    # data.sha256 names the download folder: only hex digits get through the schema
    from tlpipe.params import DataParams
    with pytest.raises(ValueError):
        DataParams(source="url", url="https://x/a.zip", sha256="../../" + "a" * 58)


def test_symlinked_class_folder_pointing_outside_the_root_is_skipped_not_copied(tmp_path, monkeypatch):
    """A symlink inside data.root that resolves outside it is refused like a bad file, unread."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for label in ("a", "b"):
        for i in range(4):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (i * 40 + 10, 0, 0) if label == "a" else (0, i * 40 + 10, 0)).save(root / label / f"{i}.png")
    elsewhere.mkdir()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(elsewhere / "private.png")
    (root / "a" / "more").symlink_to(elsewhere, target_is_directory=True)  # nested: not followed by listing
    (root / "b" / "peek.png").symlink_to(elsewhere / "private.png")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "folder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25}}))
    monkeypatch.chdir(project)
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    data.main()
    skipped = pd.read_csv(project / "data" / "prepared" / "skipped.csv")
    assert skipped.values.tolist() == [[str(root / "b" / "peek.png"), f"symlink to "
                                        f"{(elsewhere / 'private.png').resolve()}, outside the data root {root}"]]
    prepared = project / "data" / "prepared" / "images"
    assert not (prepared / "b" / "peek.png").exists()
    assert not any(p.read_bytes() == (elsewhere / "private.png").read_bytes()
                   for p in prepared.rglob("*.png"))
