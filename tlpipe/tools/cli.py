"""The `tlpipe` command: tools around the pipeline, run from the project root.

    tlpipe compare [EXP ...] [--out compare.html]
    tlpipe lr-find head|finetune [--steps N] [--start-lr 1e-7] [--end-lr 10] [--out-dir lr_find]
    tlpipe predict --model head|finetuned|FILE.onnx IMAGE_OR_FOLDER ... [--top-k K] [--out preds.csv]
    tlpipe summary

The heavy imports (torch, dvc) happen inside each command, so `tlpipe --help` is instant, and
`predict` with a .onnx file never imports torch (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from tlpipe.io import check_writable
from tlpipe.runtime import TlpipeError, check_environment, prune_finished_checkpoint, report_errors


def _writable_dir(option: str, value: str) -> None:
    path = Path(value)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise TlpipeError(f"{option} {value}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TlpipeError(f"{option} {value}: {existing} is not writable")


def check_args(args) -> None:
    """Every argument checked before any work (argparse checks only types and choices)."""
    if args.command == "lr-find":
        if not 10 <= args.steps <= 100_000:
            raise TlpipeError(f"--steps must be between 10 and 100000, got {args.steps}")
        for option, value in (("--start-lr", args.start_lr), ("--end-lr", args.end_lr),
                              ("--stop-factor", args.stop_factor)):
            if not math.isfinite(value) or value <= 0:
                raise TlpipeError(f"{option} must be a finite number above 0, got {value}")
        if args.start_lr >= args.end_lr:
            raise TlpipeError(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
        if args.stop_factor <= 1:
            raise TlpipeError(f"--stop-factor must be above 1, got {args.stop_factor:g}")
        _writable_dir("--out-dir", args.out_dir)
    elif args.command == "predict":
        if not 1 <= args.top_k <= 100_000:
            raise TlpipeError(f"--top-k must be between 1 and 100000, got {args.top_k}")
        check_writable("--out", args.out)
    elif args.command == "compare":
        check_writable("--out", args.out)


def _compare(args) -> None:
    from tlpipe.report import compare

    exps = compare.load_experiments(args.experiments)
    print(compare.report(exps, Path("."), Path(args.out)))


def _lr_find(args) -> None:
    from tlpipe.train import lrfind

    lr, rule, curve = lrfind.run(args.target, args.steps, args.start_lr, args.end_lr, args.stop_factor,
                                 Path(args.out_dir))
    stopped = "" if len(curve) == args.steps else f", stopped at step {len(curve)} (loss diverged)"
    print(f"LR range test ({args.target}): {len(curve)} steps from {curve['lr'].iloc[0]:.1e} to "
          f"{curve['lr'].iloc[-1]:.1e}{stopped}; curve: {args.out_dir}/{args.target}.csv, .png")
    print(f"suggested LR: {lr:.3g}  (rule: {rule})")
    if args.target == "finetune":
        print("  for finetune.lr; the backbone then gets finetune.lr x finetune.backbone_lr_mult")


def _predict(args) -> None:
    from tlpipe.deploy import predict

    predict.predict(args.inputs, args.model, args.top_k, Path(args.out), tta="flip" if args.tta else "none")


def _summary(args) -> None:
    from tlpipe.report import summary

    print(summary.render())


def _model(value: str) -> str:
    if value in ("head", "finetuned") or value.endswith(".onnx"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected head, finetuned or a .onnx file")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `error: ...` line (exit status 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tlpipe", description="Tools around the tlpipe pipeline "
                                "(run from the project root).")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="compare experiments: Markdown on stdout, an HTML report",
                       description="Params that differ, test metrics (best marked among experiments on "
                       "the same data), all metrics, fine-tuning curves, confusion matrices and galleries "
                       "of the baseline commit and its finished experiments.")
    c.add_argument("experiments", nargs="*", metavar="EXP",
                   help="experiment names or revs (default: the baseline commit and all its experiments; "
                        "'workspace' for the workspace)")
    c.add_argument("--out", default="compare.html",
                   help="the self-contained HTML report to write (default: %(default)s)")
    c.set_defaults(func=_compare)

    lr = sub.add_parser("lr-find", help="learning-rate range test for the head or for fine-tuning",
                        description="The LR range test: train one batch per step while the LR grows "
                        "exponentially from --start-lr to --end-lr, stop when the loss diverges, and "
                        "suggest an LR. Nothing in the pipeline changes; the curve goes to "
                        "OUT_DIR/<target>.csv and .png.")
    lr.add_argument("target", choices=["head", "finetune"],
                    help="head: a linear layer on the cached train features (seconds); finetune: the "
                         "finetune stage's start on the backbone, suggesting finetune.lr")
    lr.add_argument("--steps", type=int, default=None,
                    help="number of LR values, one batch each (default: 200 head, 60 finetune; at least 10)")
    lr.add_argument("--start-lr", type=float, default=1e-7, help="first LR (default: %(default)s)")
    lr.add_argument("--end-lr", type=float, default=10.0, help="last LR, if the loss has not diverged "
                    "before (default: %(default)s)")
    lr.add_argument("--stop-factor", type=float, default=4.0,
                    help="stop when the smoothed loss exceeds this x its best (default: %(default)s)")
    lr.add_argument("--out-dir", default="lr_find", help="where <target>.csv and .png go (default: %(default)s)")
    lr.set_defaults(func=_lr_find)

    pr = sub.add_parser("predict", help="top-k classes of images with the head, the fine-tuned model "
                        "or an exported .onnx file",
                        description="Classify new images with a model of the pipeline (models/), "
                        "preprocessed exactly as the evaluation does. Unreadable files are reported and "
                        "listed with their error; they do not stop the run.")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                    help="image files, or folders searched recursively for image files")
    pr.add_argument("--model", type=_model, required=True, metavar="head|finetuned|FILE.onnx",
                    help="head: the linear probe on the backbone's features (models/head.*); "
                         "finetuned: the fine-tuned network (models/finetuned.*); a .onnx file of the "
                         "export stages (e.g. models/finetuned.onnx) runs on onnxruntime, without torch")
    pr.add_argument("--top-k", type=int, default=1,
                    help="how many classes to list per image, most probable first (default: %(default)s)")
    pr.add_argument("--out", default="preds.csv",
                    help="CSV with path, label_1, prob_1, ..., error per image (default: %(default)s)")
    pr.add_argument("--tta", action="store_true",
                    help="test-time augmentation: average with the mirror image (twice the cost)")
    pr.set_defaults(func=_predict)

    sm = sub.add_parser("summary", help="the few lines of the last run that matter (what `make repro` ends with)",
                        description="Each model's test accuracy with its 95 % interval, the paired verdict, "
                        "calibration, how the fine-tuned epoch was kept, warnings about val's size and copies "
                        "across splits, and where the plots are; read from metrics/*.json.")
    sm.set_defaults(func=_summary)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "target", None) and args.steps is None:
        args.steps = 200 if args.target == "head" else 60
    def run():
        check_environment()
        check_args(args)
        prune_finished_checkpoint()
        args.func(args)
    report_errors(run)


if __name__ == "__main__":
    main()
