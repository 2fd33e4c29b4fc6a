"""Results you can trust (issue 17): intervals, the paired test, cross-validation, calibration,
suspect labels and near-duplicates; the statistics against hand-computed or known values, the
stages through real `dvc repro`."""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import SIGN_DIGITS, TINY, dvc, needs_sign_digits, read_json
from tlpipe.ingest import audit
from tlpipe.nets import calibration, linear
from tlpipe.report.metrics import intervals, mcnemar, paired_log_loss, wilson
from tlpipe.tools.scaffold import create_project


# --- intervals ------------------------------------------------------------------------------------

def simulate(rng, n: int, class_accuracy: np.ndarray, beta: tuple[float, float]):
    """Predictions of known quality on balanced classes: class c right with probability
    class_accuracy[c]. Right: the true class gets 1/C + (1 - 1/C) U, U ~ Beta(beta), the rest is
    shared equally (so it is the argmax); wrong: the true class gets U/C, U ~ Uniform, and one other
    class the rest (so that one is)."""
    c = len(class_accuracy)
    y = rng.integers(0, c, n)
    right = rng.random(n) < class_accuracy[y]
    p_true = np.where(right, 1 / c + (1 - 1 / c) * rng.beta(*beta, n), rng.random(n) / c)
    rows = np.arange(n)
    proba = np.zeros((n, c))
    proba[right] = ((1 - p_true[right]) / (c - 1))[:, None]
    winner = (y + rng.integers(1, c, n)) % c
    proba[rows[~right], winner[~right]] = 1 - p_true[~right]
    proba[rows, y] = p_true
    return y, proba


def population_log_loss(class_accuracy: np.ndarray, beta: tuple[float, float]) -> float:
    from scipy import integrate, stats

    c = len(class_accuracy)
    right, _ = integrate.quad(lambda u: -np.log(1 / c + (1 - 1 / c) * u) * stats.beta.pdf(u, *beta), 0, 1)
    wrong = np.log(c) + 1.0  # E[-log(U / C)], U ~ Uniform(0, 1)
    return float(np.mean(class_accuracy * right + (1 - class_accuracy) * wrong))


def test_intervals_cover_the_known_values_in_at_least_93_percent_of_200_trials():
    class_accuracy = np.array([0.95, 0.85, 0.75])  # balanced classes: accuracy = balanced accuracy = 0.85
    beta = (2.0, 2.0)
    true = {"accuracy": class_accuracy.mean(), "balanced_accuracy": class_accuracy.mean(),
            "log_loss": population_log_loss(class_accuracy, beta)}
    hits = {name: 0 for name in true}
    rng = np.random.default_rng(2026)
    trials = 200
    for _ in range(trials):
        y, proba = simulate(rng, 300, class_accuracy, beta)
        right = proba.argmax(1) == y
        assert np.all(proba.sum(1) > 0.999999) and 0.7 < right.mean() < 1.0
        ci = intervals(y, proba, seed=int(rng.integers(1 << 30)), samples=1000)
        for name, value in true.items():
            hits[name] += ci[name][0] <= value <= ci[name][1]
    coverage = {name: h / trials for name, h in hits.items()}
    assert all(c >= 0.93 for c in coverage.values()), coverage


def test_wilson_matches_hand_computed_values():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z/(1 + z^2/10) sqrt(0.016 + z^2/400)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert wilson(8, 10) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook table's values
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0, abs=1e-12) and low == pytest.approx(0.7225, abs=1e-4)


def test_bootstrap_intervals_are_seeded():
    rng = np.random.default_rng(0)
    y, proba = simulate(rng, 100, np.array([0.9, 0.8]), (5.0, 2.0))
    assert intervals(y, proba, seed=3) == intervals(y, proba, seed=3)
    assert intervals(y, proba, seed=3)["macro_f1"] != intervals(y, proba, seed=4)["macro_f1"]


# --- the paired test ------------------------------------------------------------------------------

def paired_predictions(both_right: int, a_only: int, b_only: int, both_wrong: int):
    y = np.zeros(both_right + a_only + b_only + both_wrong, dtype=int)
    a = np.concatenate([np.zeros(both_right + a_only), np.ones(b_only + both_wrong)]).astype(int)
    b = np.concatenate([np.zeros(both_right), np.ones(a_only), np.zeros(b_only), np.ones(both_wrong)]).astype(int)
    return y, a, b


@pytest.mark.parametrize("a_only, b_only, p_value", [
    (5, 1, 2 * (1 + 6) / 2 ** 6),          # 2 P(X <= 1), X ~ Bin(6, 1/2) = 14/64
    (0, 8, 2 / 2 ** 8),                     # 2 P(X = 0), X ~ Bin(8, 1/2)
    (3, 3, 1.0),                            # capped at 1
    (0, 0, 1.0),                            # no discordant pair: no evidence either way
    (10, 2, 2 * (1 + 12 + 66) / 2 ** 12),   # 2 P(X <= 2), X ~ Bin(12, 1/2) = 158/4096
    (0, 23, 2 / 2 ** 23),                   # 2.4e-07: kept to 3 significant digits, never rounded to 0
])
def test_mcnemar_equals_hand_computed_values(a_only, b_only, p_value):
    y, a, b = paired_predictions(40, a_only, b_only, 7)
    result = mcnemar(y, a, b)
    assert (result["a_only"], result["b_only"], result["both_right"], result["both_wrong"]) == (a_only, b_only, 40, 7)
    assert result["p_value"] == pytest.approx(p_value, rel=1e-2)
    assert result["significant"] == (p_value < 0.05)


def test_paired_log_loss_by_hand():
    y = np.array([0, 1, 0, 1])
    # a: p(right) = 0.5 on every image (log 2); b: logits of 0 and log 3 give p(right) = 3/4 (log 4/3)
    a = np.zeros((4, 2))
    b = np.where(np.eye(2)[y] == 1, math.log(3), 0.0)
    r = paired_log_loss(y, a, b)
    assert r["log_loss_a"] == pytest.approx(math.log(2), abs=1e-6)
    assert r["log_loss_b"] == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert r["difference"] == pytest.approx(math.log(4 / 3) - math.log(2), abs=1e-6)
    assert r["difference_se"] == 0.0  # the same gain on every image
    # b badly wrong on one image (loss 9 - log 3 + log(1 + e^-(9 - log 3))), a little better on three
    noisy = b.copy()
    noisy[0] += [0.0, 9.0]
    worst = 9 - math.log(3) + math.log1p(math.exp(-(9 - math.log(3)))) - math.log(2)
    small = math.log(4 / 3) - math.log(2)
    diffs = np.array([worst, small, small, small])
    mixed = paired_log_loss(y, a, noisy)
    assert mixed["difference"] == pytest.approx(diffs.mean(), abs=1e-6)
    assert mixed["difference_se"] == pytest.approx(diffs.std(ddof=1) / 2, abs=1e-6)
    assert paired_log_loss(y[:1], a[:1], b[:1])["difference_se"] is None


# --- cross-validation -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=240, n_features=300, n_informative=12, n_classes=3,
                               n_clusters_per_class=1, class_sep=1.0, flip_y=0.03, random_state=0)
    return torch.from_numpy(x).float() * 7 + 3, torch.from_numpy(y).long()


def test_cv_choice_is_deterministic_for_a_seed(blobs):
    x, y = blobs
    grid = np.logspace(-4, 1, 8)[::-1]
    first = linear.cv_sweep(x, y, 3, grid, 300, 5, seed=7)
    again = linear.cv_sweep(x, y, 3, grid, 300, 5, seed=7)
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3][0], again[3][0])
    other = linear.cv_sweep(x, y, 3, grid, 300, 5, seed=8)
    assert other[0] != first[0]  # other folds, other held-out scores
    rows, best, oof, (w, b) = first
    assert rows[best]["cv_log_loss"] == min(r["cv_log_loss"] for r in rows)
    assert oof.shape == (len(y), 3) and w.shape == (3, x.shape[1])
    assert all(r["cv_log_loss_sd"] > 0 for r in rows)


def test_cv_fold_fits_equal_separate_fits_in_the_row_span(blobs):
    """The batched fold fit in the rows' span reaches each fold's own optimum (fewer rows than dims)."""
    x, y = blobs
    l2 = 0.05
    rows, best, oof, _ = linear.cv_sweep(x, y, 3, [l2], 2000, 4, seed=1)
    folds = linear.stratified_folds(y, 4, 1)
    scaler = linear.Standardizer.fit(x.double())
    z = scaler(x.double())
    for k in range(4):
        train = folds != k
        w, b = linear.fit_logistic(z[train], y[train], 3, l2, 5000)
        expected = z[~train] @ w.T + b
        assert float((torch.softmax(oof[~train], 1) - torch.softmax(expected, 1)).abs().max()) < 5e-3


# --- calibration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_temperature_scaling_never_raises_val_log_loss(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 400)), int(rng.integers(2, 12))
    y = torch.from_numpy(rng.integers(0, c, n))
    logits = torch.from_numpy(rng.normal(0, 1, (n, c)))
    logits[torch.arange(n), y] += float(rng.uniform(-1, 4))  # from useless to good
    logits *= float(np.exp(rng.uniform(-2, 2)))               # under- to overconfident
    t = calibration.fit_temperature(logits, y)
    assert calibration.log_loss(logits, y, t) <= calibration.log_loss(logits, y)
    assert t > 0


def test_temperature_undoes_a_known_overconfidence():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 4, 5000))
    logits = torch.from_numpy(rng.normal(0, 1, (5000, 4)))
    logits[torch.arange(5000), y] += 1.5
    # labels drawn from softmax(logits) are calibrated at T = 1; the model reports logits x 3
    y = torch.multinomial(torch.softmax(logits, 1), 1)[:, 0]
    t = calibration.fit_temperature(logits * 3, y)
    assert t == pytest.approx(3.0, rel=0.08)
    before = calibration.ece(y.numpy(), torch.softmax(logits * 3, 1).numpy())
    after = calibration.ece(y.numpy(), calibration.scaled_proba(logits * 3, t).numpy())
    assert after < 0.03 < before


def test_ece_matches_hand_computed_value():
    # two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right)
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert calibration.ece(y, proba) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))


# --- suspect labels and near-duplicates -----------------------------------------------------------

def test_suspect_labels_flag_confidently_other_images():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.05, 0.95], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1, 0, 1])
    found = audit.suspect_labels(proba, labels)
    # thresholds: class 0 mean(0.9, 0.8, 0.05) = 0.583, class 1 mean(0.9, 0.8, 0.4) = 0.7
    # row 4 (given 0, p1 = 0.95 >= 0.7) and row 5 (given 1, p0 = 0.6 >= 0.583): most suspect first
    assert list(found["index"]) == [4, 5] and list(found["suspected"]) == [1, 0]


@pytest.mark.slow  # a pipeline run to evaluate
def test_near_duplicate_of_a_test_image_in_train_is_reported(tmp_path):
    """A resized, re-encoded copy of a test image placed in train: sha256 differs, features do not."""
    from sklearn.datasets import load_digits

    root = tmp_path / "source"
    digits = load_digits()
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("val", 4)):  # presplit: val/ becomes the test split
        for label in (0, 1, 2):
            (root / split / f"d{label}").mkdir(parents=True)
    for label in (0, 1, 2):
        idx = rng.permutation(np.flatnonzero(digits.target == label))[:14]
        for k, i in enumerate(idx):
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            img = Image.fromarray(pixels, "L").resize((48, 48), Image.BICUBIC)
            img.save(root / ("train" if k < 10 else "val") / f"d{label}" / f"{i:04d}.png")
    original = root / "val" / "d2" / sorted(p.name for p in (root / "val" / "d2").iterdir())[0]
    Image.open(original).resize((40, 40), Image.BILINEAR).convert("RGB").save(
        root / "train" / "d2" / "copy.jpg", quality=85)
    project = create_project(tmp_path / "project", {**TINY, "data.source": "presplit", "data.root": str(root)})
    result = dvc(project, "repro", "evaluate")  # the report's stage and what it reads; no exports
    report = pd.read_csv(project / "metrics" / "duplicates.csv")
    pair = report[(report["path_a"].str.endswith("copy.jpg") | report["path_b"].str.endswith("copy.jpg"))
                  & (report["path_a"].str.endswith(original.name) | report["path_b"].str.endswith(original.name))]
    assert len(pair) == 1, report
    row = pair.iloc[0]
    assert row["kind"] == "near" and row["cosine"] >= 0.95 and not row["conflict"]
    assert "test" in row["splits"]
    assert "copies across splits" in result.stdout and "test" in result.stdout
    assert read_json(project / "metrics" / "test.json")["duplicates"]["near_across_splits"] >= 1


@pytest.mark.slow
@needs_sign_digits()
def test_flipped_sign_digit_labels_are_flagged(tmp_path):
    """5 % of sign-digits' labels flipped (a CSV source over the shared images): at least 70 % of
    the top flagged train + val images, in a list as long as the flips there, are flipped ones."""
    files = sorted(SIGN_DIGITS.glob("*/*"))
    rng = np.random.default_rng(0)
    labels = [f.parent.name for f in files]
    flipped = set(rng.choice(len(files), size=round(0.05 * len(files)), replace=False).tolist())
    classes = sorted(set(labels))
    given = [classes[(classes.index(l) + int(rng.integers(1, len(classes)))) % len(classes)] if i in flipped else l
             for i, l in enumerate(labels)]
    root = tmp_path / "source"  # a temporary copy (28 MB): the CSV must sit in data.root
    shutil.copytree(SIGN_DIGITS, root / "images")
    rel = [f"images/{f.relative_to(SIGN_DIGITS)}" for f in files]
    pd.DataFrame({"file": rel, "label": given}).to_csv(root / "labels.csv", index=False)
    project = create_project(tmp_path / "project", {
        "data.source": "csv", "data.root": str(root), "image.img_size": 96, "image.resize_size": 100})
    dvc(project, "repro", "head")
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    flipped_paths = {rel[i] for i in flipped}
    seen = manifest[manifest["split"].isin(["train", "val"])]
    targets = set(seen["path"]) & flipped_paths
    suspects = pd.read_csv(project / "metrics" / "suspect_labels.csv")
    top = list(suspects["path"].head(len(targets)))
    precision = len(set(top) & targets) / len(targets)
    assert precision >= 0.70, (precision, len(targets), len(suspects))
