"""The plain references tlpipe is measured against, written the way tutorials write them.

Nothing here is tuned: `ImageFolder`, the classic torchvision transforms, a `DataLoader` with its
defaults, `model.eval()` and `torch.no_grad()`, scikit-learn with a loop over C (and folds). Each
function returns its results and the seconds its loop took (what the timing includes is in its docstring).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms


def eval_transform(resize_size: int, img_size: int, mean=None, std=None) -> transforms.Compose:
    """The tutorial's evaluation preprocessing, at tlpipe's geometry (bicubic, as params.yaml)."""
    steps = [transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.CenterCrop(img_size),
             transforms.ToTensor()]
    if mean is not None:
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def stats_two_pass(root: Path, resize_size: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and std of the images under root, the classic way: a batch-size-1
    DataLoader, one pass for the mean, a second for the std. Timed: dataset listing and both passes.

    Sums are float64 (a float32 running sum over millions of pixels would itself miss 1e-4).
    """
    start = time.perf_counter()
    dataset = datasets.ImageFolder(str(root), transform=eval_transform(resize_size, img_size))
    loader = DataLoader(dataset, batch_size=1, shuffle=False)

    total = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for images, _ in loader:  # pass 1: mean
        total += images.double().sum(dim=(0, 2, 3))
        pixels += images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / pixels

    squares = torch.zeros(3, dtype=torch.float64)
    for images, _ in loader:  # pass 2: std around that mean
        squares += ((images.double() - mean.view(1, 3, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    std = (squares / pixels).sqrt()
    return mean, std, time.perf_counter() - start


def features_plain_loop(root: Path, model: torch.nn.Module, resize_size: int, img_size: int,
                        mean, std, batch_size: int = 32, num_workers: int = 0,
                        limit: int | None = None) -> tuple[torch.Tensor, list[str], float]:
    """The model's outputs for every image under root (the first `limit` ones if given), the
    tutorial way: ImageFolder, Normalize in the transform, DataLoader(batch_size=32) with the
    default num_workers=0, model.eval(), torch.no_grad(), default NCHW memory layout.
    Timed: dataset listing, loading, preprocessing and the forward passes (not building the model)."""
    start = time.perf_counter()
    dataset = datasets.ImageFolder(str(root), transform=eval_transform(resize_size, img_size, mean, std))
    paths = [p for p, _ in dataset.samples]
    if limit is not None and limit < len(dataset):
        dataset, paths = Subset(dataset, range(limit)), paths[:limit]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    model.eval()
    outputs = []
    with torch.no_grad():
        for images, _ in loader:
            outputs.append(model(images))
    return torch.cat(outputs), paths, time.perf_counter() - start


def decoded_inputs(root: Path, resize_size: int, img_size: int, mean, std, count: int) -> torch.Tensor:
    """The first `count` images under root, preprocessed and normalized, stacked in memory (NCHW)."""
    dataset = datasets.ImageFolder(str(root), transform=eval_transform(resize_size, img_size, mean, std))
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def forward_throughput(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int,
                       channels_last: bool, repeats: int = 3, dev: torch.device = torch.device("cpu"),
                       amp: bool = False) -> float:
    """Images/s of the model's forward alone, on tensors already in memory (on `dev`; with `amp`,
    under bf16 autocast): the compute limit. One untimed warm-up batch (oneDNN or cuDNN picks its
    kernels on the first call), then all batches timed, `repeats` times; the best pass counts (a
    limit is the best the machine does, not a typical pass)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(dev, memory_format=fmt)
    batches = [inputs[i:i + batch_size].to(dev).contiguous(memory_format=fmt)
               for i in range(0, len(inputs), batch_size)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    best = float("inf")
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        model(batches[0])
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for x in batches:
                model(x)
            sync()
            best = min(best, time.perf_counter() - start)
    return len(inputs) / best


def sklearn_c(l2: float, n_fit: int, n_classes: int) -> float:
    """scikit-learn's C for tlpipe's L2 on n_fit rows.

    tlpipe minimizes mean cross-entropy + l2/2 ||W||^2 over a softmax with one weight row per
    class; scikit-learn minimizes C * summed cross-entropy + 1/2 ||W||^2, the same objective at
    C = 1 / (l2 * n_fit). With two classes scikit-learn fits one weight vector v (the logistic
    model), and tlpipe's two rows w1 = -w2 = v/2 at the optimum penalize l2/4 ||v||^2: C doubles.
    """
    return (2.0 if n_classes == 2 else 1.0) / (l2 * n_fit)


def sklearn_cv_logistic(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                        l2_grid: np.ndarray, max_iter: int, folds: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """StandardScaler + LogisticRegression, C chosen by k-fold cross-validation, refitted on all rows.

    The head stage's protocol with scikit-learn's own tools: one scaler on all the fit rows, the
    given folds (the same StratifiedKFold split as tlpipe's), each fold walking the grid from strong
    to weak L2 with `warm_start=True` (as tlpipe does), C = sklearn_c(l2, rows fitted), the C with
    the lowest mean held-out log loss kept, then one fit on all the rows at that L2.
    Timed: scaling, every fit, the held-out scoring and the final fit (not the test scoring).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    n_classes = len(np.unique(y_fit))
    labels = np.arange(n_classes)
    start = time.perf_counter()
    scaler = StandardScaler().fit(x_fit)
    xs = scaler.transform(x_fit)
    losses = np.zeros((len(folds), len(l2_grid)))
    accuracies = np.zeros_like(losses)
    not_converged = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for k, (train, held_out) in enumerate(folds):
            model = LogisticRegression(max_iter=max_iter, warm_start=True)
            for j, l2 in enumerate(l2_grid):
                model.set_params(C=sklearn_c(l2, len(train), n_classes)).fit(xs[train], y_fit[train])
                losses[k, j] = log_loss(y_fit[held_out], model.predict_proba(xs[held_out]), labels=labels)
                accuracies[k, j] = model.score(xs[held_out], y_fit[held_out])
        best = int(np.argmin(losses.mean(0)))
        model = LogisticRegression(C=sklearn_c(l2_grid[best], len(y_fit), n_classes), max_iter=max_iter)
        model.fit(xs, y_fit)
        not_converged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    seconds = time.perf_counter() - start
    l2 = float(l2_grid[best])
    return {"seconds": seconds, "l2": l2, "C": sklearn_c(l2, len(y_fit), n_classes),
            "cv_log_loss": float(losses.mean(0)[best]), "cv_accuracy": float(accuracies.mean(0)[best]),
            "test_accuracy": model.score(scaler.transform(x_test), y_test),
            "fits": len(folds) * len(l2_grid) + 1, "not_converged": not_converged}


def sklearn_tuned_logistic(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                           x_test: np.ndarray, y_test: np.ndarray, l2_grid: np.ndarray,
                           max_iter: int) -> dict:
    """StandardScaler + LogisticRegression, C tuned on val over the same grid as tlpipe's head
    (the classic protocol, head.cv_folds 0): fitted on train, C = sklearn_c(l2, n_train).
    Timed: scaling, every fit and its val scoring (the same work as the head stage's sweep).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n_classes = len(np.unique(y_train))
    start = time.perf_counter()
    scaler = StandardScaler().fit(x_train)
    xs_train, xs_val = scaler.transform(x_train), scaler.transform(x_val)
    best = None
    not_converged = 0
    for l2 in l2_grid:
        c = sklearn_c(l2, len(x_train), n_classes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=max_iter).fit(xs_train, y_train)
        not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        val_accuracy = model.score(xs_val, y_val)
        if best is None or val_accuracy > best[0]:
            best = (val_accuracy, l2, model)
    seconds = time.perf_counter() - start
    val_accuracy, l2, model = best
    return {"seconds": seconds, "l2": float(l2), "C": sklearn_c(l2, len(x_train), n_classes), "val_accuracy": val_accuracy,
            "test_accuracy": model.score(scaler.transform(x_test), y_test), "fits": len(l2_grid),
            "not_converged": not_converged}


if __name__ == "__main__":
    # A library of the benchmark scripts (bench/stats.py, features.py, head.py use it); --help says so.
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0],
                            epilog="Used by bench/stats.py, bench/features.py and bench/head.py.").parse_args()
    print(__doc__)
