"""Multinomial logistic regression on cached features, by full-batch L-BFGS (the linear probe).

Features are standardized with train statistics while fitting (it conditions L-BFGS well and makes
one L2 grid fit every backbone); the standardization is undone in the weights at the end
(`raw_weights`), so the saved head is a plain Linear layer on raw backbone features, ready to sit on
the backbone. Statistics and `raw_weights` are float64; the head's sweep fits in float32, about 3x
faster than float64 (bench/head.py) and choosing the same L2 with the same accuracies: standardized features keep the
problem well conditioned. The single probe fine-tuning starts from stays float64.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Standardizer:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Standardizer":
        std = x.std(dim=0)
        # Constant features (e.g. dead ReLUs) carry no signal; dividing by 1 keeps them harmless.
        return cls(x.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize mean cross-entropy + l2/2 * ||W||^2 (bias unpenalized). x: standardized."""
    d = x.shape[1]
    w = torch.zeros(n_classes, d, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(n_classes, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def raw_weights(w: torch.Tensor, b: torch.Tensor, scaler: Standardizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the same classifier acting on raw (unstandardized) features."""
    w_raw = w / scaler.std
    return w_raw, b - w_raw @ scaler.mean


def predict_proba(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.to(weight.dtype) @ weight.T + bias, dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def sweep(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
          val_labels: torch.Tensor, n_classes: int, grid, max_iter: int):
    """The linear probe protocol: one fit per L2 in `grid` (strongest first, each warm-started from
    the last), the best val accuracy kept (ties: lower val log loss).

    Returns a row of scores per grid point, the index of the kept one, and its raw-feature weights.
    """
    scaler = Standardizer.fit(train_features.double())
    x_train, x_val = scaler(train_features.double()).float(), scaler(val_features.double()).float()
    rows, fits, init = [], [], None
    for l2 in grid:
        w, b = fit_logistic(x_train, train_labels, n_classes, float(l2), max_iter, init)
        init = (w, b)
        fits.append((w, b))
        val_logits = x_val @ w.T + b
        rows.append({
            "log10_l2": round(math.log10(l2), 4),
            "l2": float(l2),
            "train_accuracy": round(accuracy(x_train @ w.T + b, train_labels), 6),
            "val_accuracy": round(accuracy(val_logits, val_labels), 6),
            "val_log_loss": round(float(F.cross_entropy(val_logits, val_labels)), 6),
        })
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"]))
    w, b = fits[best]
    return rows, best, raw_weights(w.double(), b.double(), scaler)


PROBE_MAX_ITER = 1000  # L-BFGS stops on its tolerances long before this; a cap, not a knob


def fit_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float,
              max_iter: int = PROBE_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear probe at a given L2 strength: standardize, fit, back to raw features. Returns raw-feature weights.

    The head stage's grid fit at a single L2 point, cold-started, gives the same weights (to float32
    precision: the sweep fits in float32).
    """
    # One fit, so float64 costs little here; fine-tuning starts from it and early stopping compares
    # every epoch with it, so it is kept at full precision.
    x = features.double()
    scaler = Standardizer.fit(x)
    return raw_weights(*fit_logistic(scaler(x), labels, n_classes, l2, max_iter), scaler)


# --- choosing L2 by stratified k-fold cross-validation -----------------------------------------

def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The held-out fold of every sample: scikit-learn's StratifiedKFold, shuffled by `seed`."""
    from sklearn.model_selection import StratifiedKFold

    y = labels.numpy()
    fold = torch.empty(len(y), dtype=torch.long)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, held_out) in enumerate(splitter.split(y, y)):
        fold[torch.from_numpy(held_out)] = i
    return fold


def _fold_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(k, n, c) logits of k models (w: k x c x d) on every row of x, as one matrix product."""
    k, c, d = w.shape
    return torch.addmm(b.reshape(-1).to(x.dtype), x, w.reshape(k * c, d).to(x.dtype).T).view(len(x), k, c).transpose(0, 1)


def _fit_folds(x: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor, n_classes: int, l2: float,
               max_iter: int, init: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """k independent fits (one per fold, on its training rows) as one L-BFGS problem.

    The objective is a sum of independent convex problems, so its optimum is every fold's own
    optimum; one batched problem costs one optimizer loop instead of k. SciPy's L-BFGS-B (what
    scikit-learn's lbfgs solver runs) with the gradient written out: torch.optim's first step
    costs seconds of one-off imports, more than the whole cross-validation on a small set. The
    products with x are float32 (x's dtype), and one product serves all k folds: with a few classes
    they are bound by reading x, which fitting the folds apart would do k times. The loss is summed
    in float64: near the optimum float32 rounding hides the decrease the line search looks for (on
    sign-digits features up to 1.7x as many evaluations as iterations per L2, now about 1.1x).
    """
    from scipy.optimize import minimize

    k, c, d = init[0].shape
    n = len(x)
    # (n, k): each row's weight in each fold's mean loss (0 where the fold holds it out)
    weights = (train_mask.double() / train_mask.sum(1, keepdim=True)).T.contiguous()[..., None]
    onehot = F.one_hot(y, n_classes).double()[:, None, :]             # (n, 1, c)

    def loss_and_grad(theta):
        t = torch.from_numpy(theta)
        w, b = t[:k * c * d].view(k * c, d), t[k * c * d:]
        log_p = torch.addmm(b.to(x.dtype), x, w.to(x.dtype).T).double().view(n, k, c).log_softmax(2)
        loss = -(weights * log_p * onehot).sum() + 0.5 * l2 * (w * w).sum()
        g = (weights * (log_p.exp() - onehot)).view(n, k * c)
        grad = torch.cat([((g.T.to(x.dtype) @ x).double() + l2 * w).view(-1), g.sum(0)])
        return float(loss), grad.numpy()

    theta0 = torch.cat([init[0].reshape(-1), init[1].reshape(-1)]).double().numpy()
    result = minimize(loss_and_grad, theta0, jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": CV_TOLERANCE, "maxcor": 10})
    theta = torch.from_numpy(result.x)
    return theta[:k * c * d].view(k, c, d).clone(), theta[k * c * d:].view(k, c).clone()


# Below this many multiply-adds per loss evaluation (rows x dims x classes) an evaluation takes well
# under a millisecond, and synchronizing torch's threads at every operation costs more than they
# save: on the shared 2-core machine hymenoptera's cross-validation took 0.9 s with 2 threads, 0.1 s
# with 1.
SINGLE_THREAD_WORK = 1 << 22


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# L-BFGS stops when every gradient entry of a fold's mean loss is below this, as scikit-learn's lbfgs
# solver (tol=1e-4).
CV_TOLERANCE = 1e-4
# The sweep walks from strong to weak L2 and stops once the held-out log loss has risen at this many
# successive grid points past its lowest: the weak end costs the most iterations and, past the
# minimum, only overfits further.
CV_PATIENCE = 3


def cv_sweep(features: torch.Tensor, labels: torch.Tensor, n_classes: int, grid, max_iter: int,
             folds: int, seed: int):
    """Choose L2 by stratified k-fold CV (mean held-out log loss), then fit once on all the rows.

    Features are standardized once with the statistics of all rows (unsupervised; the held-out
    fold's labels are never seen). An L2-penalized linear model's weights lie in the span of its
    training rows, so when there are fewer rows than dimensions the problem is solved exactly in
    that span (an SVD), which makes small sets cheap.

    Returns a row of scores per grid point (mean and sd over folds), the index of the kept one, the
    out-of-fold logits at the kept L2 (every row scored by the fold model that did not see it), and
    the raw-feature weights of the final fit.
    """
    rows, best, oof, finish = cv_curve(features, labels, n_classes, grid, max_iter, folds, seed)
    return rows, best, oof, finish()


def cv_curve(features: torch.Tensor, labels: torch.Tensor, n_classes: int, grid, max_iter: int,
             folds: int, seed: int):
    """cv_sweep without its final fit: (rows, kept index, out-of-fold logits, finish), where finish()
    makes the final fit and returns its raw-feature weights. The head compares several feature sets
    by their curves and fits only the one it keeps."""
    n, d = features.shape
    work = n * (folds - 1) // folds * min(n, d) * n_classes
    threads = 1 if work < SINGLE_THREAD_WORK else torch.get_num_threads()
    with _threads(threads):
        rows, best, oof, finish = _cv_sweep(features, labels, n_classes, grid, max_iter, folds, seed)

    def finish_with_threads():
        with _threads(threads):
            return finish()
    return rows, best, oof, finish_with_threads


def _cv_sweep(features, labels, n_classes, grid, max_iter, folds, seed):
    x_all = features.double()
    scaler = Standardizer.fit(x_all)
    z = scaler(x_all)
    basis = None
    if z.shape[0] < z.shape[1]:
        # z = U S V^T: the coordinates of the rows in the basis V are U S, from the small Gram matrix
        eigval, u = torch.linalg.eigh(z @ z.T)
        keep = eigval > eigval.max() * 1e-12
        s, u = eigval[keep].sqrt(), u[:, keep]
        basis = (z.T @ u / s).T                              # (r, d), orthonormal rows
        z = u * s
    x = z.float()  # float32 halves the cost of every product; the optimizer's state stays float64
    fold_of = stratified_folds(labels, folds, seed)
    held_out = fold_of[None, :] == torch.arange(folds)[:, None]  # (k, n)
    w = torch.zeros(folds, n_classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(folds, n_classes, dtype=torch.float64)
    rows, oof_logits, fits = [], [], []
    for l2 in grid:
        lowest = min(range(len(rows)), key=lambda i: rows[i]["cv_log_loss"], default=0)
        if len(rows) - 1 - lowest >= CV_PATIENCE:
            break
        w, b = _fit_folds(x, labels, ~held_out, n_classes, float(l2), max_iter, (w, b))
        fits.append((w, b))
        logits = _fold_logits(x, w, b)
        own = logits[fold_of, torch.arange(len(labels))].double()   # each row by the model that held it out
        oof_logits.append(own)
        nll = F.cross_entropy(own, labels, reduction="none")
        per_fold_loss = torch.stack([nll[held_out[k]].mean() for k in range(folds)])
        per_fold_acc = torch.stack([(own[held_out[k]].argmax(1) == labels[held_out[k]]).double().mean()
                                    for k in range(folds)])
        rows.append({
            "log10_l2": round(math.log10(l2), 4),
            "l2": float(l2),
            "cv_log_loss": round(float(per_fold_loss.mean()), 6),
            "cv_log_loss_sd": round(float(per_fold_loss.std()), 6),
            "cv_accuracy": round(float(per_fold_acc.mean()), 6),
            "cv_accuracy_sd": round(float(per_fold_acc.std()), 6),
        })
    best = min(range(len(rows)), key=lambda i: (rows[i]["cv_log_loss"], -rows[i]["cv_accuracy"]))
    for row in rows:
        row["cv_log_loss_minus_sd"] = round(row["cv_log_loss"] - row["cv_log_loss_sd"], 6)
        row["cv_log_loss_plus_sd"] = round(row["cv_log_loss"] + row["cv_log_loss_sd"], 6)
    w_k, b_k = fits[best]

    def finish():
        # The final fit on every row, warm-started from the mean of the fold models at that L2.
        everything = torch.ones(1, len(labels), dtype=torch.bool)
        w_fin, b_fin = _fit_folds(x, labels, everything, n_classes, float(grid[best]), max_iter,
                                  (w_k.mean(0, keepdim=True), b_k.mean(0, keepdim=True)))
        w_fin, b_fin = w_fin[0], b_fin[0]
        if basis is not None:
            w_fin = w_fin @ basis
        return raw_weights(w_fin, b_fin, scaler)
    return rows, best, oof_logits[best].double(), finish
