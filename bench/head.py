"""head: tlpipe's head stage against scikit-learn's LogisticRegression with C tuned on the same val split.

    python bench/head.py [--quick] [--n 5000] [--sets hymenoptera,synthetic] [--workdir DIR]

Target (DESIGN.md §8, §9): at least scikit-learn's test accuracy, in no more time, including the
head's cross-validation. Both fit the same cached features (the features stage's) over the same
grid (params.yaml head.*; C = 1 / (l2 * n_train)) and are scored on the same test split;
scikit-learn chooses C on the val split and fits on train, tlpipe (head.cv_folds >= 2) chooses L2
by stratified k-fold CV on train + val and fits on both.
tlpipe's time is the head stage's `done in` time (reading the features, the whole grid, writing the
model and metrics; not Python start-up) and, where tlpipe.linear.sweep exists, that sweep timed
in-process (the target uses it then); scikit-learn's is in-process: scaling, every fit, its val
scoring (not loading the features). Test accuracy of tlpipe is the stage's saved head.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import common
import reference
from common import Project, Section, Target, say, table


def split_features(project: Project, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(project.path / "data" / "features" / f"{split}.safetensors"))
    return t["features"], t["labels"]


def run(project: Project, workdir: Path, args=None) -> Section:
    project.prepare("features")
    h = project.params()["head"]
    grid = np.logspace(h["l2_min_log10"], h["l2_max_log10"], h["l2_steps"])[::-1]  # as stages/head.py
    stage = project.run("head")

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (split_features(project, s)
                                                            for s in ("train", "val", "test"))
    model = load_file(str(project.path / "models" / "head.safetensors"))
    test_accuracy = float(((x_test @ model["weight"].T + model["bias"]).argmax(1) == y_test).double().mean())
    chosen = json.loads((project.path / "metrics" / "head.json").read_text())
    chosen.setdefault("val_accuracy", chosen.get("cv_accuracy"))  # CV: the mean held-out accuracy

    # The in-process equivalent of the stage's work (tlpipe.linear.sweep, what stages/head.py calls),
    # comparable with scikit-learn's in-process loop: no start-up, no reading or writing files.
    from tlpipe import linear

    sweep = None
    if hasattr(linear, "cv_sweep") and h.get("cv_folds", 0) >= 2:
        # What stages/head.py runs: stratified k-fold CV on train + val, then the final fit on both.
        # The one-off imports (scipy.optimize, sklearn.model_selection) are paid before the clock,
        # as scikit-learn's are for the reference.
        import scipy.optimize  # noqa: F401
        import sklearn.model_selection  # noqa: F401
        say(f"{project.label}: tlpipe.linear.cv_sweep in-process ({h['cv_folds']} folds) ...")
        x_fit, y_fit = torch.cat([x_train, x_val]), torch.cat([y_train, y_val])
        start = time.perf_counter()
        cv_rows, best, _, (w, b) = linear.cv_sweep(x_fit, y_fit, int(y_train.max()) + 1, grid, h["max_iter"],
                                                   h["cv_folds"], project.params()["seed"])
        sweep = {"seconds": time.perf_counter() - start, "l2": cv_rows[best]["l2"],
                 "val_accuracy": cv_rows[best]["cv_accuracy"], "fits": len(cv_rows) * h["cv_folds"] + 1,
                 "run": f"tlpipe: linear.cv_sweep, in-process ({h['cv_folds']}-fold CV + final fit; "
                        f"'val accuracy' is CV accuracy)",
                 "test_accuracy": float(((x_test.double() @ w.T + b).argmax(1) == y_test).double().mean())}
    elif hasattr(linear, "sweep"):
        say(f"{project.label}: tlpipe.linear.sweep in-process ...")
        start = time.perf_counter()
        sweep_rows, best, (w, b) = linear.sweep(x_train, y_train, x_val, y_val, int(y_train.max()) + 1,
                                                grid, h["max_iter"])
        sweep = {"seconds": time.perf_counter() - start, "l2": sweep_rows[best]["l2"],
                 "val_accuracy": sweep_rows[best]["val_accuracy"], "fits": len(grid),
                 "run": "tlpipe: linear.sweep, in-process",
                 "test_accuracy": float(((x_test.double() @ w.T + b).argmax(1) == y_test).double().mean())}

    say(f"{project.label}: scikit-learn LogisticRegression over {len(grid)} values of C ...")
    sk = reference.sklearn_tuned_logistic(x_train.numpy(), y_train.numpy(), x_val.numpy(), y_val.numpy(),
                                          x_test.numpy(), y_test.numpy(), grid, h["max_iter"])
    say(f"{project.label}: scikit-learn done in {sk['seconds']:.1f}s")

    n = f"{len(y_train)}/{len(y_val)}/{len(y_test)}"
    section = Section(f"head: {project.label} ({n} train/val/test images, {x_train.shape[1]}-d features)")
    rows = [["tlpipe: head stage (L-BFGS, warm-started sweep)", len(grid), f"{chosen['l2']:.3g}",
             chosen["val_accuracy"], test_accuracy, stage.seconds, f"stage time; wall {stage.wall:.1f}s"]]
    if sweep:
        rows.append([sweep["run"], sweep["fits"], f"{sweep['l2']:.3g}", sweep["val_accuracy"],
                     sweep["test_accuracy"], sweep["seconds"], "in-process"])
    rows.append(["reference: StandardScaler + LogisticRegression(C), best C on val", sk["fits"], f"{sk['l2']:.3g}",
                 sk["val_accuracy"], sk["test_accuracy"], sk["seconds"],
                 f"in-process; C={sk['C']:.3g}; max_iter={h['max_iter']}"
                 + (f"; {sk['not_converged']} fits hit max_iter" if sk["not_converged"] else "")])
    section.parts.append(table(["run", "grid points", "chosen l2", "val accuracy", "test accuracy", "seconds",
                                "note"], rows))
    section.parts.append("Ties on val accuracy: tlpipe keeps the lower val log loss, scikit-learn the "
                         "first (strongest L2) of the grid, which is walked from strong to weak L2 in both.")
    seconds, which = (sweep["seconds"], "in-process sweep") if sweep else (stage.seconds, "head stage")
    accuracy_ok = test_accuracy >= sk["test_accuracy"]
    time_ok = seconds <= sk["seconds"]
    section.targets.append(Target(f"head vs scikit-learn ({project.label})",
                                  ">= its test accuracy, in no more time",
                                  f"accuracy {test_accuracy:.4f} vs {sk['test_accuracy']:.4f}; "
                                  f"{seconds:.2f}s ({which}) vs {sk['seconds']:.2f}s",
                                  accuracy_ok and time_ok,
                                  "; ".join(n for ok, n in ((accuracy_ok, "lower accuracy"), (time_ok, "slower"))
                                            if not ok)))
    return section


if __name__ == "__main__":
    common.standalone(run, __doc__.splitlines()[0])
