"""The pieces of the fine-tuning recipe (tlpipe.train.finetuning), each against a hand computation."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from tlpipe.nets import inference
from tlpipe.nets.models import Classifier
from tlpipe.params import FinetuneParams
from tlpipe.train import distributed, finetuning


def recipe(**changes):
    return SimpleNamespace(**{**FinetuneParams().model_dump(), **changes})


def tiny_classifier() -> tuple[Classifier, list]:
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Classifier(trunk, torch.nn.Linear(4, 3))
    return model, [[trunk[0], trunk[1]], [trunk[3]]]


def test_ema_is_the_hand_computed_moving_average_of_the_weights():
    model, _ = tiny_classifier()
    ema = finetuning.make_ema(model, recipe(ema_decay=0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = None
    for step in range(4):
        loss = model(torch.randn(2, 3, 8, 8)).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        weights = model.head.weight.detach().clone()
        expected = weights if expected is None else 0.9 * expected + 0.1 * weights  # first update copies
    assert torch.allclose(ema.module.head.weight, expected, atol=1e-6)
    assert finetuning.make_ema(model, recipe(ema_decay=0.0)) is None


@pytest.mark.parametrize("mix", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0),
                                 dict(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.5)])
def test_mixup_and_cutmix_labels_are_distributions(mix):
    torch.manual_seed(0)
    apply = finetuning.make_mixing(recipe(**mix), n_classes=5)
    mixed_any = False
    for _ in range(10):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
        x_mixed, soft = apply(x, y)
        assert x_mixed.shape == x.shape and soft.shape == (8, 5)
        assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft >= 0).all()
        mixed_any |= bool((soft.max(1).values < 1).any())
    assert mixed_any
    assert finetuning.make_mixing(recipe(), n_classes=5) is None


def test_class_balanced_sampler_draws_classes_uniformly():
    targets = torch.tensor([0] * 500 + [1] * 50 + [2] * 10)  # 50:5:1
    weights = finetuning.class_weights(targets, 3)[targets]
    group = distributed.Group(0, 1, torch.device("cpu"))
    batches = distributed.GlobalBatches(len(targets), 32, group, seed=0, weights=weights)
    drawn = []
    for epoch in range(5):
        batches.epoch = epoch
        drawn += [i for b in batches.global_batches() for i in b]
    counts = np.bincount(targets[drawn].numpy(), minlength=3)
    assert stats.chisquare(counts).pvalue > 0.01, counts  # uniform over classes
    assert len(batches) == len(targets) // 32  # an epoch is still n draws
    # an image drawn again within the epoch comes with its repeat count, so it is augmented afresh
    keys = [key for batch in batches for key in batch]
    assert len(set(keys)) == len(keys) and max(r for _, r in keys) > 0
    assert [i for i, _ in keys] == [i for b in batches.global_batches() for i in b]


def test_class_weights_make_each_class_weigh_the_same():
    targets = torch.tensor([0] * 8 + [1] * 2)
    w = finetuning.class_weights(targets, 2)
    assert torch.allclose(w, torch.tensor([10 / 16, 10 / 4]))
    assert float((w[targets]).sum()) == pytest.approx(len(targets))


def test_layer_wise_lr_decay_gives_each_block_below_the_top_a_smaller_lr():
    model, blocks = tiny_classifier()
    f = recipe(lr=1e-3, backbone_lr_mult=0.1, layer_decay=0.5)
    lrs = {id(p): g["lr"] for g in finetuning.make_optimizer(model, f, blocks).param_groups for p in g["params"]}
    assert lrs[id(model.head.weight)] == pytest.approx(1e-3)
    assert lrs[id(blocks[1][0].weight)] == pytest.approx(1e-4)       # top block: lr x backbone_lr_mult
    assert lrs[id(blocks[0][0].weight)] == pytest.approx(0.5e-4)     # the block below: x layer_decay
    assert lrs[id(blocks[0][1].weight)] == pytest.approx(0.5e-4)
    assert len(lrs) == sum(1 for _ in model.parameters())            # every parameter, once
    one_lr = sorted({round(g["lr"], 12) for g in finetuning.make_optimizer(
        model, recipe(lr=1e-3, backbone_lr_mult=0.1), blocks).param_groups})
    assert one_lr == [1e-4, 1e-3]  # layer_decay 1: one backbone LR


def test_flip_tta_averages_the_image_and_its_mirror_image():
    model, _ = tiny_classifier()
    model.eval()
    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    batches = [(images[:3], None), (images[3:], None)]
    mean, std = [0.5] * 3, [0.25] * 3
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        expected = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
    got = inference.class_probabilities(model, batches, mean, std, torch.device("cpu"), tta="flip")
    assert torch.allclose(got, expected, atol=1e-5)
    plain = inference.class_probabilities(model, batches, mean, std, torch.device("cpu"))
    assert not torch.allclose(plain, expected, atol=1e-5)
