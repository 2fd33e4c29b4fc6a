"""Unit tests for tlpipe.nets.linear: the L-BFGS linear probe against scikit-learn's optimum."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from tlpipe.nets import linear

N_CLASSES = 3


@pytest.fixture(scope="module")
def problem():
    """Overlapping 3-class data (not separable, so the optimum is finite even for small l2)."""
    x, y = make_classification(n_samples=400, n_features=20, n_informative=8, n_redundant=4,
                               n_classes=N_CLASSES, n_clusters_per_class=2, class_sep=0.8,
                               flip_y=0.05, random_state=0)
    rng = np.random.default_rng(1)
    # raw features on wildly different scales and offsets, as backbone features can be
    x = x * rng.uniform(0.01, 50.0, x.shape[1]) + rng.uniform(-100, 100, x.shape[1])
    x_raw = torch.from_numpy(x).double()
    scaler = linear.Standardizer.fit(x_raw)
    return x_raw, scaler, scaler(x_raw), torch.from_numpy(y).long()


def objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float) -> float:
    return float(F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum())


def sklearn_fit(x: torch.Tensor, y: torch.Tensor, l2: float):
    n = x.shape[0]
    clf = LogisticRegression(C=1.0 / (n * l2), solver="lbfgs", tol=1e-10, max_iter=10000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x.numpy(), y.numpy())
    return clf, torch.from_numpy(clf.coef_).double(), torch.from_numpy(clf.intercept_).double()


@pytest.mark.parametrize("l2", [1e-1, 1e-2, 1e-3])
def test_fit_logistic_reaches_sklearn_optimum(problem, l2):
    _, _, x, y = problem
    w, b = linear.fit_logistic(x, y, N_CLASSES, l2, max_iter=2000)
    clf, w_sk, b_sk = sklearn_fit(x, y, l2)

    assert w.shape == (N_CLASSES, x.shape[1]) and b.shape == (N_CLASSES,)
    assert w.dtype == torch.float64 and not w.requires_grad and not b.requires_grad

    ours = linear.predict_proba(x, w, b)
    theirs = torch.from_numpy(clf.predict_proba(x.numpy()))
    assert float((ours - theirs).abs().max()) < 1e-4
    np.testing.assert_allclose(ours.sum(1).numpy(), 1.0, rtol=1e-12)

    f_ours, f_sk = objective(x, y, w, b, l2), objective(x, y, w_sk, b_sk, l2)
    assert abs(f_ours - f_sk) < 1e-8 * max(1.0, abs(f_sk))
    # the problem is not trivial: the fit is far better than chance, but not perfect
    chance = float(np.log(N_CLASSES))
    assert f_ours < 0.9 * chance
    accuracy = float((ours.argmax(1) == y).double().mean())
    assert 0.6 < accuracy < 1.0


def test_fit_logistic_bias_is_not_penalized():
    # one feature of pure noise, imbalanced classes: with a huge l2, W -> 0 and the bias alone
    # must reproduce the class frequencies (log-prior), which a penalized bias could not
    rng = np.random.default_rng(0)
    y = torch.from_numpy(np.repeat([0, 1, 2], [60, 30, 10])).long()
    x = torch.from_numpy(rng.standard_normal((100, 1)))
    w, b = linear.fit_logistic(x, y, N_CLASSES, l2=1e4, max_iter=500)
    assert float(w.abs().max()) < 1e-3
    prior = torch.softmax(b, 0)
    np.testing.assert_allclose(prior.numpy(), [0.6, 0.3, 0.1], atol=1e-4)


def test_warm_start_converges_to_the_same_solution(problem):
    _, _, x, y = problem
    cold = linear.fit_logistic(x, y, N_CLASSES, 1e-3, max_iter=2000)
    start = linear.fit_logistic(x, y, N_CLASSES, 1e-1, max_iter=2000)
    start_copy = (start[0].clone(), start[1].clone())
    warm = linear.fit_logistic(x, y, N_CLASSES, 1e-3, max_iter=2000, init=start)

    # the warm start began elsewhere (a different l2 optimum) and was not modified in place
    assert float((start[0] - cold[0]).abs().max()) > 1e-2
    assert torch.equal(start[0], start_copy[0]) and torch.equal(start[1], start_copy[1])
    p_cold = linear.predict_proba(x, *cold)
    p_warm = linear.predict_proba(x, *warm)
    assert float((p_cold - p_warm).abs().max()) < 1e-4
    assert abs(objective(x, y, *cold, 1e-3) - objective(x, y, *warm, 1e-3)) < 1e-9


def test_fold_gives_same_logits_on_raw_features(problem):
    x_raw, scaler, x, y = problem
    w, b = linear.fit_logistic(x, y, N_CLASSES, 1e-2, max_iter=500)
    w_raw, b_raw = linear.raw_weights(w, b, scaler)
    assert w_raw.shape == w.shape and b_raw.shape == b.shape

    logits_std = x @ w.T + b
    logits_raw = x_raw @ w_raw.T + b_raw
    torch.testing.assert_close(logits_raw, logits_std, rtol=0, atol=1e-9)
    torch.testing.assert_close(linear.predict_proba(x_raw, w_raw, b_raw),
                               linear.predict_proba(x, w, b), rtol=0, atol=1e-12)
    # new raw data too, not only the data the scaler was fitted on
    fresh = x_raw[:50] * 1.3 + 0.7
    torch.testing.assert_close(fresh @ w_raw.T + b_raw, scaler(fresh) @ w.T + b, rtol=0, atol=1e-9)


def test_fold_with_a_constant_column():
    rng = np.random.default_rng(3)
    x_raw = torch.from_numpy(np.column_stack([rng.normal(5, 3, 50), np.full(50, 42.0),
                                              rng.normal(-2, 0.1, 50)]))
    scaler = linear.Standardizer.fit(x_raw)
    w = torch.from_numpy(rng.standard_normal((2, 3)))
    b = torch.from_numpy(rng.standard_normal(2))
    w_raw, b_raw = linear.raw_weights(w, b, scaler)
    assert torch.isfinite(w_raw).all() and torch.isfinite(b_raw).all()
    torch.testing.assert_close(x_raw @ w_raw.T + b_raw, scaler(x_raw) @ w.T + b, rtol=0, atol=1e-9)


def test_standardizer_maps_constant_column_to_zero():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.column_stack([rng.normal(10, 4, 100), np.full(100, 7.5),
                                          np.zeros(100), rng.uniform(-1, 1, 100)]))
    scaler = linear.Standardizer.fit(x)
    z = scaler(x)
    assert not torch.isnan(z).any() and torch.isfinite(scaler.std).all()
    assert float(z[:, 1].abs().max()) == 0.0
    assert float(z[:, 2].abs().max()) == 0.0
    torch.testing.assert_close(z[:, [0, 3]].mean(0), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(z[:, [0, 3]].std(0), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # fitted statistics are kept: new data is mapped with the train mean and std
    np.testing.assert_allclose(scaler.mean.numpy(), x.mean(0).numpy(), rtol=1e-15)
    assert float(scaler.std[1]) == 1.0 and float(scaler.std[2]) == 1.0
    torch.testing.assert_close(scaler(x[:5] + 1.0)[:, 1], torch.ones(5, dtype=torch.float64))


def test_sweep_fits_in_float32_yet_reaches_the_float64_optimum(problem):
    """The sweep's float32 fits land on the objective's float64 optimum, to float32 precision."""
    x_raw, scaler, x, y = problem
    train, val = slice(0, 300), slice(300, 400)
    grid = [1.0, 1e-1, 1e-2]
    rows, best, (w_raw, b_raw) = linear.sweep(x_raw[train], y[train], x_raw[val], y[val], N_CLASSES, grid, 1000)
    assert w_raw.dtype == torch.float64 and len(rows) == 3
    assert rows[best]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    # the same problem in float64 throughout, at the chosen L2
    scaler = linear.Standardizer.fit(x_raw[train])
    w64, b64 = linear.raw_weights(*linear.fit_logistic(scaler(x_raw[train]), y[train], N_CLASSES, grid[best], 5000),
                           scaler)
    p32 = linear.predict_proba(x_raw[val], w_raw, b_raw)
    p64 = linear.predict_proba(x_raw[val], w64, b64)
    assert float((p32 - p64).abs().max()) < 1e-3
    assert torch.equal(p32.argmax(1), p64.argmax(1))
