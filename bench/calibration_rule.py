"""When is fitting a temperature on a small held-out set worth it? tlpipe.nets.calibration's rule against others.

    python bench/calibration_rule.py [--trials 40]

Simulated models whose miscalibration is known: logits z (the true class gets `strength` more
than N(0, 1) noise), labels drawn from softmax(z / T*), T* = 0.5 (underconfident), 1 or 2
(overconfident); 2 and 10 classes; held-out sets of 12 to 300 images. Each rule's T is scored by
its expected log loss on 5,000 test images of the same model, against T = 1. Prints a Markdown
table (docs/trust.md, "When a temperature is fitted at all"); a few minutes on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tlpipe.nets import calibration  # noqa: E402

OLD_T_RANGE = (math.exp(-4), math.exp(4))  # the search before the rule: any fit that lowered held-out log loss


def fit(z: np.ndarray, y: np.ndarray, bounds: tuple[float, float]) -> float:
    def loss(log_t):
        return -log_softmax(z / math.exp(log_t), 1)[np.arange(len(y)), y].mean()
    r = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                        options={"xatol": 1e-5})
    return math.exp(r.x) if loss(r.x) < loss(0.0) else 1.0


def draw(rng, n: int, classes: int, strength: float, t_star: float):
    z = rng.normal(0, 1, (n, classes))
    z[np.arange(n), rng.integers(0, classes, n)] += strength
    p = np.exp(log_softmax(z / t_star, 1))
    return z, (p.cumsum(1) > rng.random((n, 1))).argmax(1), p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40, help="held-out sets per setting (default: %(default)s)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_min, e_min, bounds = calibration.MIN_IMAGES, calibration.MIN_ERRORS, calibration.T_RANGE
    rules = {
        f"always, T in [{OLD_T_RANGE[0]:.3f}, {OLD_T_RANGE[1]:.0f}] (before)": None,
        f"always, T in [{bounds[0]:g}, {bounds[1]:g}]": lambda n, e: True,
        f"n >= {n_min}, errors >= 3": lambda n, e: n >= n_min and e >= 3,
        f"**n >= {n_min}, errors >= {e_min} (tlpipe)**": "tlpipe",
        f"n >= {n_min}, errors >= 10": lambda n, e: n >= n_min and e >= 10,
        f"errors >= {e_min}, any n": lambda n, e: e >= e_min,
    }
    change = {name: [] for name in rules}
    for classes in (2, 10):
        for t_star in (0.5, 1.0, 2.0):
            for strength in (3.0, 5.0, 7.0):
                zt, _, pt = draw(rng, 5000, classes, strength, t_star)

                def test_loss(t: float) -> float:
                    return float(-(pt * log_softmax(zt / t, 1)).sum(1).mean())
                base = test_loss(1.0)
                for n in (12, 24, 50, 100, 300):
                    for _ in range(args.trials):
                        z, y, _ = draw(rng, n, classes, strength, t_star)
                        errors = int((z.argmax(1) != y).sum())
                        bounded = fit(z, y, bounds)
                        for name, rule in rules.items():
                            if rule is None:
                                t = fit(z, y, OLD_T_RANGE)
                            elif rule == "tlpipe":
                                t = calibration.calibrate(torch.from_numpy(z), torch.from_numpy(y), "val").value
                            else:
                                t = bounded if rule(n, errors) else 1.0
                            change[name].append(test_loss(t) - base)
    sets = len(next(iter(change.values())))
    print(f"| rule ({sets} held-out sets) | mean change of test log loss | sets made worse | worst 1 % of sets |")
    print("|---|---|---|---|")
    for name, values in change.items():
        v = np.array(values)
        print(f"| {name} | {v.mean():+.3f} | {(v > 1e-9).mean():.0%} | {np.percentile(v, 99):+.3f} |")


if __name__ == "__main__":
    main()
