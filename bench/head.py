"""head: tlpipe's head stage against scikit-learn's LogisticRegression with C tuned by the same protocol.

    python bench/head.py [--quick] [--n 5000] [--sets hymenoptera,synthetic] [--repeats 5] [--workdir DIR]

Target (DESIGN.md §8, §9): at least scikit-learn's test accuracy, in no more time, including the
head's cross-validation. Both fit the same cached features (the features stage's) over the same
grid (params.yaml head.*; C = reference.sklearn_c(l2, rows fitted)) by the same protocol and are
scored on the same test split. With head.cv_folds >= 2 (the default): the same stratified folds of
train + val (tlpipe.nets.linear.stratified_folds, seeded by `seed`), L2 chosen by the mean held-out log
loss, the final fit on train + val. With head.cv_folds 0: chosen on val, fitted on train.
Both sides are timed in-process (no start-up, no reading or writing files; the one-off imports are
paid before the clock), alternately, `--repeats` times each, and the median counts: the machine is
shared and a sub-second sweep is noisy. tlpipe's in-process run is what stages/head.py calls; the
stage's own `done in` time (reading the features, the sweep, writing model and metrics) is shown
too. Test accuracy of tlpipe is the stage's saved head.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

import common
import reference
from common import Project, Section, Target, say, table
from tlpipe.manifest import SPLITS  # noqa: E402 (common puts this checkout's tlpipe first)

REPEATS = 5


def split_features(project: Project, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(project.path / "data" / "features" / f"{split}.safetensors"))
    return t["features"].float(), t["labels"]  # stored as float16


def timed(fn, seconds: list[float]) -> dict:
    """fn()'s result; its seconds appended to `seconds`."""
    start = time.perf_counter()
    result = fn()
    seconds.append(time.perf_counter() - start)
    return result


def run(project: Project, workdir: Path, args=None) -> Section:
    from tlpipe.nets import linear

    project.prepare("features")
    params = project.params()
    if params["head"].get("layers", "last") != "last":
        # scikit-learn's side fits the last layer: so does the head here (bench/layers.py times the rest)
        params["head"]["layers"] = "last"
        (project.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    head, seed = params["head"], params["seed"]
    grid = np.logspace(head["l2_min_log10"], head["l2_max_log10"], head["l2_steps"])[::-1]  # as stages/head.py
    repeats = getattr(args, "repeats", None) or REPEATS
    folds = head.get("cv_folds", 0)
    stage = project.run("head")

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (split_features(project, s)
                                                            for s in SPLITS)
    n_classes = int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    model = load_file(str(project.path / "models" / "head.safetensors"))
    test_accuracy = float(((x_test @ model["weight"].T + model["bias"]).argmax(1) == y_test).double().mean())
    chosen = json.loads((project.path / "metrics" / "head.json").read_text())

    def test_acc(w, b) -> float:
        return float(((x_test.double() @ w.T + b).argmax(1) == y_test).double().mean())

    # The one-off imports of both sides, before any clock.
    for module in ("scipy.optimize", "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection"):
        importlib.import_module(module)

    if folds >= 2:
        # What stages/head.py runs: stratified k-fold CV on train + val, then the final fit on both.
        x_fit, y_fit = torch.cat([x_train, x_val]), torch.cat([y_train, y_val])
        fold_of = linear.stratified_folds(y_fit, folds, seed).numpy()
        split = [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(folds)]
        protocol = f"{folds}-fold CV on train + val (the same folds), refit on both"

        def ours() -> dict:
            rows, best, _, (w, b) = linear.cv_sweep(x_fit, y_fit, n_classes, grid, head["max_iter"], folds, seed)
            return {"l2": rows[best]["l2"], "cv_log_loss": rows[best]["cv_log_loss"],
                    "cv_accuracy": rows[best]["cv_accuracy"], "fits": len(rows) * folds + 1, "w": w, "b": b}

        def theirs() -> dict:
            return reference.sklearn_cv_logistic(x_fit.numpy(), y_fit.numpy(), x_test.numpy(), y_test.numpy(),
                                                 grid, head["max_iter"], split)
        held = "CV"
    else:
        protocol = "chosen on val, fitted on train"

        def ours() -> dict:
            rows, best, (w, b) = linear.sweep(x_train, y_train, x_val, y_val, n_classes, grid, head["max_iter"])
            return {"l2": rows[best]["l2"], "cv_log_loss": rows[best]["val_log_loss"],
                    "cv_accuracy": rows[best]["val_accuracy"], "fits": len(grid), "w": w, "b": b}

        def theirs() -> dict:
            return reference.sklearn_tuned_logistic(x_train.numpy(), y_train.numpy(), x_val.numpy(), y_val.numpy(),
                                                    x_test.numpy(), y_test.numpy(), grid, head["max_iter"])
        held = "val"

    say(f"{project.label}: tlpipe.nets.linear and scikit-learn in-process, {repeats} times each, alternately "
        f"({protocol}) ...")
    tl_seconds, sk_seconds = [], []
    for _ in range(repeats):
        tl = timed(ours, tl_seconds)
        sk = timed(theirs, sk_seconds)
    tl_median, sk_median = statistics.median(tl_seconds), statistics.median(sk_seconds)
    tl_test = test_acc(tl["w"], tl["b"])
    say(f"{project.label}: tlpipe {tl_median:.2f}s, scikit-learn {sk_median:.2f}s (medians)")

    def spread(seconds: list[float]) -> str:
        return f"median of {len(seconds)}, range {min(seconds):.3g}-{max(seconds):.3g}s"

    n = f"{len(y_train)}/{len(y_val)}/{len(y_test)}"
    section = Section(f"head: {project.label} ({n} train/val/test images, {x_train.shape[1]}-d features)")
    section.parts.append(f"Protocol on both sides: {len(grid)}-point L2 grid, {protocol}; max_iter "
                         f"{head['max_iter']}. '{held} log loss' and '{held} accuracy' are of the chosen L2.")
    rows = [["tlpipe: head stage (python -m stages.head)", f"{chosen['l2']:.3g}",
             chosen.get("cv_log_loss", chosen.get("val_log_loss")), chosen.get("cv_accuracy", chosen.get("val_accuracy")),
             test_accuracy, stage.seconds, "", f"stage's own time (reads, sweep, writes); wall {stage.wall:.1f}s"],
            [f"tlpipe: linear.{'cv_sweep' if folds >= 2 else 'sweep'}, in-process", f"{tl['l2']:.3g}",
             tl["cv_log_loss"], tl["cv_accuracy"], tl_test, tl_median, tl["fits"], spread(tl_seconds)],
            ["reference: StandardScaler + LogisticRegression(C, warm_start) over folds" if folds >= 2 else
             "reference: StandardScaler + LogisticRegression(C), best C on val", f"{sk['l2']:.3g}",
             sk.get("cv_log_loss", ""), sk.get("cv_accuracy", sk.get("val_accuracy")), sk["test_accuracy"],
             sk_median, sk["fits"], spread(sk_seconds) + f"; C={sk['C']:.3g}"
             + (f"; {sk['not_converged']} fits hit max_iter" if sk["not_converged"] else "")]]
    section.parts.append(table(["run", "chosen l2", f"{held} log loss", f"{held} accuracy", "test accuracy",
                                "seconds", "fits", "note"], rows))
    if folds >= 2:
        section.parts.append(f"tlpipe stops walking the grid once the held-out log loss has risen at "
                             f"{linear.CV_PATIENCE} successive points past its lowest; scikit-learn walks all of it.")
    accuracy_ok = test_accuracy >= sk["test_accuracy"]
    time_ok = tl_median <= sk_median
    section.targets.append(Target(f"head vs scikit-learn ({project.label})",
                                  ">= its test accuracy, in no more time",
                                  f"accuracy {test_accuracy:.4f} vs {sk['test_accuracy']:.4f}; "
                                  f"{tl_median:.3g}s vs {sk_median:.3g}s (in-process, medians of {repeats})",
                                  accuracy_ok and time_ok,
                                  "; ".join(n for ok, n in ((accuracy_ok, "lower accuracy"), (time_ok, "slower"))
                                            if not ok)))
    return section


def extra_args(parser) -> None:
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"timed runs of each side, alternately; the median counts (default {REPEATS})")


if __name__ == "__main__":
    common.standalone(run, __doc__.splitlines()[0], extra_args)
