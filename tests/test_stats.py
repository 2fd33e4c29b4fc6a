"""tlpipe.ingest.moments.ChannelMoments, what the stats stage streams over: per-channel mean and std."""

import numpy as np
import pytest
import torch

from tlpipe.ingest import moments


@pytest.fixture(scope="module")
def ChannelMoments():
    return moments.ChannelMoments


def random_batches(sizes, seed=0, hw=(7, 5)):
    rng = np.random.default_rng(seed)
    # each channel with its own range, so channels cannot be mixed up without failing
    batches = []
    for n in sizes:
        b = np.empty((n, 3, *hw), dtype=np.uint8)
        b[:, 0] = rng.integers(0, 256, (n, *hw))
        b[:, 1] = rng.integers(100, 140, (n, *hw))
        b[:, 2] = rng.integers(0, 30, (n, *hw))
        batches.append(b)
    return batches


def reference(batches):
    x = np.concatenate(batches).astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def feed(ChannelMoments, batches):
    moments = ChannelMoments()
    for b in batches:
        moments.update(torch.from_numpy(b))
    return moments


def test_matches_numpy_over_the_concatenation(ChannelMoments):
    batches = random_batches([16, 3, 1, 9, 16, 2])
    moments = feed(ChannelMoments, batches)
    mean, std = reference(batches)
    assert moments.mean.dtype == torch.float64 and moments.std.dtype == torch.float64
    assert moments.count == 47 * 7 * 5
    np.testing.assert_allclose(moments.mean.numpy(), mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.std.numpy(), std, rtol=1e-12, atol=0)
    # sanity: the channels really differ
    assert std[0] > 0.25 and std[2] < 0.05 and abs(mean[1] - 120 / 255) < 0.01


@pytest.mark.parametrize("sizes", [[47], [1] * 47, [20, 27], [5, 13, 8, 21]])
def test_same_result_whatever_the_batching(ChannelMoments, sizes):
    images = np.concatenate(random_batches([47], seed=1))
    splits = np.cumsum(sizes)[:-1]
    batches = np.split(images, splits)
    moments = feed(ChannelMoments, batches)
    whole = feed(ChannelMoments, [images])
    mean, std = reference([images])
    np.testing.assert_allclose(moments.mean.numpy(), whole.mean.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.std.numpy(), whole.std.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.mean.numpy(), mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.std.numpy(), std, rtol=1e-12, atol=0)


def test_large_offset_is_stable(ChannelMoments):
    # nearly constant bright images: naive sum-of-squares variance would lose precision here
    rng = np.random.default_rng(2)
    batches = [(250 + rng.integers(0, 3, (n, 3, 16, 16))).astype(np.uint8) for n in (8, 3, 8, 1)]
    moments = feed(ChannelMoments, batches)
    mean, std = reference(batches)
    np.testing.assert_allclose(moments.mean.numpy(), mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.std.numpy(), std, rtol=1e-12, atol=0)


def test_constant_images_have_zero_std(ChannelMoments):
    batch = torch.full((4, 3, 6, 6), 51, dtype=torch.uint8)
    moments = feed(ChannelMoments, [batch.numpy(), batch[:1].numpy()])
    torch.testing.assert_close(moments.mean, torch.full((3,), 0.2, dtype=torch.float64),
                               rtol=1e-15, atol=0)
    assert float(moments.std.abs().max()) < 1e-12


def test_update_does_not_modify_the_batch(ChannelMoments):
    batch = torch.from_numpy(random_batches([2])[0])
    copy = batch.clone()
    ChannelMoments().update(batch)
    assert torch.equal(batch, copy)


def test_refuses_float_images(ChannelMoments):
    with pytest.raises(TypeError, match="uint8"):
        ChannelMoments().update(torch.zeros(1, 3, 2, 2))
