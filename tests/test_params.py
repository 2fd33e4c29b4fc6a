"""Unit tests for tlpipe.params: schema validation, error messages and read recording."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tlpipe.params import Params, RecordingParams, load_params
from tlpipe.runtime import TlpipeError

PROJECT = Path(__file__).resolve().parents[1]

DEFAULTS_YAML = """\
seed: 0
data:
  source: digits
  root: data/sources
  csv_file: labels.csv
  file_column: file
  label_column: label
  url: ""
  sha256: ""
  archive_layout: folder
  val_fraction: 0.15
  test_fraction: 0.15
  on_bad_file: skip
image:
  img_size: 64
  resize_size: 64
  interpolation: bicubic
backbone:
  name: tf_efficientnet_lite0
  normalize: backbone
head:
  l2_min_log10: -6
  l2_max_log10: 1
  l2_steps: 15
  max_iter: 300
"""

SHA = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(TlpipeError) as err:
        load_params("x", write(tmp_path, text))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "params.yaml"))
    return message


def test_defaults_only_file_loads(tmp_path):
    p = load_params("x", write(tmp_path, DEFAULTS_YAML))
    assert isinstance(p, RecordingParams)
    assert p.seed == 0
    assert p.data.source == "digits" and p.data.val_fraction == 0.15
    assert p.image.img_size == 64 and p.image.interpolation == "bicubic"
    assert p.backbone.name == "tf_efficientnet_lite0"
    assert p.head.max_iter == 300 and p.head.l2_min_log10 == -6.0
    assert p._model == Params()


@pytest.mark.parametrize("text", ["seed: 0\n", "head: {}\n"])
def test_partial_file_uses_defaults(tmp_path, text):
    assert load_params("x", write(tmp_path, text))._model == Params()


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_is_refused_not_taken_for_defaults(tmp_path, text):
    # all defaults would switch a photo project to the digits source and overwrite its data (issue 30)
    path = write(tmp_path, text)
    with pytest.raises(TlpipeError) as err:
        load_params("x", path)
    assert str(err.value).startswith(f"{path}: empty (no params); restore it (git checkout")


def test_project_params_yaml_loads():
    assert load_params("x", PROJECT / "params.yaml").head.max_iter >= 1


def test_overrides_are_read(tmp_path):
    p = load_params("x", write(tmp_path, """\
        seed: 7
        data: {source: url, url: "https://example.org/a.zip", sha256: %s, archive_layout: csv}
        image: {img_size: 32, resize_size: 36, interpolation: bilinear}
        """ % SHA))
    assert (p.seed, p.data.source, p.data.sha256, p.data.archive_layout) == (7, "url", SHA, "csv")
    assert (p.image.img_size, p.image.resize_size, p.image.interpolation) == (32, 36, "bilinear")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    message = error_of(tmp_path, "head:\n  max_iters: 100\n")
    assert "head.max_iters" in message
    assert "unknown key" in message
    assert "did you mean max_iter" in message


def test_unknown_top_level_key_is_named(tmp_path):
    message = error_of(tmp_path, "seeds: 3\n")
    assert "seeds: unknown key" in message
    assert "did you mean seed" in message


def test_wrong_type_names_the_key(tmp_path):
    message = error_of(tmp_path, "image:\n  img_size: big\n")
    assert "image.img_size" in message
    assert "integer" in message


def test_wrong_literal_names_the_key(tmp_path):
    message = error_of(tmp_path, "image:\n  interpolation: nearest\n")
    assert "image.interpolation" in message
    assert "bicubic" in message


@pytest.mark.parametrize("key, value", [("data.val_fraction", 1.5), ("data.test_fraction", -0.1),
                                        ("image.img_size", 4), ("head.max_iter", 0)])
def test_out_of_range_names_the_key(tmp_path, key, value):
    section, leaf = key.split(".")
    message = error_of(tmp_path, f"{section}:\n  {leaf}: {value}\n")
    assert key in message


def test_fractions_summing_to_one_or_more_are_an_error(tmp_path):
    message = error_of(tmp_path, "data:\n  val_fraction: 0.5\n  test_fraction: 0.5\n")
    assert "data" in message and "val_fraction + test_fraction" in message
    error_of(tmp_path, "data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n")
    assert load_params("x", write(tmp_path, "data:\n  val_fraction: 0.5\n  test_fraction: 0.49\n"))


def test_url_source_needs_url_and_sha256(tmp_path):
    for data in ('{source: url, url: "https://example.org/a.zip"}',
                 '{source: url, sha256: %s}' % SHA):
        message = error_of(tmp_path, f"data: {data}\n")
        assert "data.sha256" in message and "data.url" in message
    message = error_of(tmp_path, 'data: {source: url, url: "https://example.org/a.zip", sha256: abc}\n')
    assert "data.sha256: must be 64 hexadecimal digits" in message


def test_url_source_rejects_non_hex_sha256(tmp_path):
    error_of(tmp_path, 'data: {source: url, url: "https://example.org/a.zip", sha256: %s}\n' % ("zz" * 32))


def test_geometry_and_grid_cross_checks(tmp_path):
    assert "resize_size must be >= img_size" in error_of(
        tmp_path, "image: {img_size: 64, resize_size: 32}\n")
    assert "l2_max_log10 must be >= l2_min_log10" in error_of(
        tmp_path, "head: {l2_min_log10: 0, l2_max_log10: -1}\n")


def test_invalid_yaml_is_one_line(tmp_path):
    message = error_of(tmp_path, "head:\n  max_iter: [1, 2\nseed: 0\n")
    assert "not valid YAML" in message


def test_missing_file(tmp_path):
    with pytest.raises(TlpipeError, match="not found"):
        load_params("x", tmp_path / "absent.yaml")


def test_params_are_read_only(tmp_path):
    p = load_params("x", write(tmp_path, DEFAULTS_YAML))
    with pytest.raises(ValidationError, match="frozen"):
        p._model.seed = 3
    with pytest.raises(AttributeError):
        p.head.no_such_leaf


def test_recording_params_records_exactly_the_leaves_read(tmp_path):
    p = load_params("x", write(tmp_path, DEFAULTS_YAML))
    assert p._reads == set()
    head = p.head  # a section is not a leaf
    assert p._reads == set()
    assert head.max_iter == 300
    assert p.seed == 0
    assert p._reads == {"head.max_iter", "seed"}
    p.head.max_iter, p.image.img_size, p.data.source  # repeated and new reads
    assert p._reads == {"head.max_iter", "seed", "image.img_size", "data.source"}


def test_recording_in_separate_loads_is_separate(tmp_path):
    path = write(tmp_path, DEFAULTS_YAML)
    a, b = load_params("a", path), load_params("b", path)
    a.seed
    b.head.l2_steps
    assert a._reads == {"seed"} and b._reads == {"head.l2_steps"}


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=60)


def test_params_log_written_at_exit(tmp_path, monkeypatch):
    path = write(tmp_path, DEFAULTS_YAML)
    log = tmp_path / "reads.jsonl"
    log.write_text('{"stage": "earlier", "params": []}\n')  # the log is appended to
    monkeypatch.setenv("TLPIPE_PARAMS_LOG", str(log))
    code = textwrap.dedent(f"""
        from tlpipe.params import load_params
        p = load_params("mystage", {str(path)!r})
        p.seed
        p.head.max_iter
        p.image.img_size
        p.head.max_iter
        """)
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"stage": "earlier", "params": []}
    assert json.loads(lines[1]) == {"stage": "mystage",
                                    "params": ["head.max_iter", "image.img_size", "seed"]}


def test_params_log_not_written_without_env(tmp_path, monkeypatch):
    path = write(tmp_path, DEFAULTS_YAML)
    monkeypatch.delenv("TLPIPE_PARAMS_LOG", raising=False)
    proc = run_python(f"from tlpipe.params import load_params; load_params('s', {str(path)!r}).seed",
                      tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_malformed_backbone_name_is_refused_at_load(tmp_path):
    # Only the form is checked here (cheap); unknown names: tests/test_backbones.py
    message = error_of(tmp_path, "backbone:\n  name: resnet 50\n")
    assert "backbone.name: 'resnet 50' is not a model name" in message
    tagged = load_params("x", write(tmp_path, "backbone:\n  name: convnext_tiny.fb_in22k_ft_in1k\n"))
    assert tagged.backbone.name == "convnext_tiny.fb_in22k_ft_in1k"


def test_probe_only_is_zero_finetune_epochs(tmp_path):
    assert load_params("x", write(tmp_path, "finetune:\n  epochs: 0\n")).finetune.epochs == 0
    assert "finetune.epochs: Input should be greater than or equal to 0" in error_of(
        tmp_path, "finetune:\n  epochs: -1\n")


def test_params_import_does_not_import_torch():
    proc = run_python("import sys, tlpipe.params; print('torch' in sys.modules)", PROJECT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_several_errors_are_reported_together_on_one_line(tmp_path):
    message = error_of(tmp_path, "data:\n  on_bad_file: ignore\n  val_fractoin: 0.1\nimage:\n  img_size: 4\n")
    assert "data.on_bad_file: Input should be 'skip' or 'fail'" in message
    assert "data.val_fractoin: unknown key (did you mean val_fraction" in message
    assert "image.img_size: Input should be greater than or equal to 8" in message


@pytest.mark.parametrize("yaml_text, key", [
    ("image: 5\n", "image"),                  # a section that is not a mapping
    ("head:\n  l2_steps: 2.5\n", "head.l2_steps"),  # a fraction for an integer
    ("finetune:\n  hflip: maybe\n", "finetune.hflip"),
])
def test_wrong_shapes_name_the_key(tmp_path, yaml_text, key):
    assert f"{key}: " in error_of(tmp_path, yaml_text)


def test_a_file_that_is_not_a_mapping_says_what_it_holds(tmp_path):
    assert error_of(tmp_path, "- a\n- b\n").startswith(
        f"{tmp_path / 'params.yaml'}: holds a list, not a mapping of sections (data:, image:, ...); restore it")


def test_a_stage_with_bad_params_fails_before_any_work(tmp_path, monkeypatch):
    from stages import data

    monkeypatch.chdir(tmp_path)
    write(tmp_path, "backbone:\n  name: resnet 18\n")
    with pytest.raises(TlpipeError, match=r"backbone\.name: 'resnet 18' is not a model name"):
        data.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_schema_defaults_are_the_shipped_params_yaml():
    """One source of defaults: a key left out of a user's params.yaml means what the shipped file says."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert Params().model_dump() == shipped
