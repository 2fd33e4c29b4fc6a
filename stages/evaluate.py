"""evaluate: score both models on the test split, the one split no choice was made on.

The head is scored on the cached test features of the layers it reads (head.json's `layers`); the
near-duplicate report compares last-layer features, whatever the head reads. The fine-tuned model by the logits the infer stage
computed on the test images. Evaluate itself runs no network, so re-scoring after a head-only
change takes a second. metrics/test.json holds one block per model ({"head": {...}, "finetuned":
{...}}) with 95 % intervals and calibration, the paired McNemar verdict, the val size, which model
to ship judged on val alone (`val_comparison`: test never chooses) and the duplicates found
(docs/trust.md); per-class scores and per-image predictions sit beside it.
"""

import pandas as pd

from tlpipe.ingest import audit
from tlpipe.io import atomic_path, load_tensors, read_json, write_json
from tlpipe.manifest import read_manifest
from tlpipe.nets import calibration, layers
from tlpipe.nets.features import check_provenance, load_split
from tlpipe.params import load_params
from tlpipe.paths import (DUPLICATES, FEATURES, FINETUNED_CALIBRATION, HEAD, HEAD_CONFIG, RELIABILITY,
                          TEST_DUPLICATES, TEST_METRICS, TEST_PER_CLASS)
from tlpipe.report import test_scores
from tlpipe.report.metrics import mcnemar, per_class, with_intervals
from tlpipe.runtime import TlpipeError, run_stage


def main() -> None:
    params = load_params("evaluate")
    evaluate, seed = params.evaluate, params.seed
    manifest, classes = read_manifest()
    test, meta = load_split("test")
    head_cfg = read_json(HEAD_CONFIG)
    check_provenance(HEAD_CONFIG, head_cfg, meta, "rerun the head stage")
    head = load_tensors(HEAD, "head", head_cfg.get("sha256"), HEAD_CONFIG)
    keys = layers.of_model(head_cfg)
    layers.check_keys(keys, meta, f"{HEAD_CONFIG} (rerun the head stage)")
    x_head = layers.concat(layers.read("test", keys, test, meta, FEATURES), keys)
    if x_head.shape[1] != head["weight"].shape[1]:
        raise TlpipeError(f"{HEAD}: takes {head['weight'].shape[1]} features, its layers {keys} have "
                          f"{x_head.shape[1]}; rerun the head stage")
    y_true = test["labels"].numpy()
    logits = {"head": x_head.double() @ head["weight"].double().T + head["bias"].double(),
              "finetuned": test_scores.finetuned_logits(test["ids"], classes)}
    fits = {"head": head_cfg, "finetuned": read_json(FINETUNED_CALIBRATION)}  # temperature, calibrated, reason
    temperature = {name: fit["temperature"] for name, fit in fits.items()}

    scores, probas, calibrated, curves = {}, {}, {}, {}
    for name, z in logits.items():
        proba, scaled = (calibration.scaled_proba(z, t).numpy() for t in (1.0, temperature[name]))
        probas[name], calibrated[name] = proba, scaled
        scores[name] = {**with_intervals(y_true, proba, seed, evaluate.bootstrap_samples),
                        "log_loss_calibrated": round(calibration.log_loss(z, test["labels"], temperature[name]), 6),
                        "ece": round(calibration.ece(y_true, proba), 6),
                        "ece_calibrated": round(calibration.ece(y_true, scaled), 6),
                        "temperature": temperature[name], "calibrated": fits[name].get("calibrated", True),
                        "calibration_reason": fits[name].get("calibration_reason", "")}
        curves[name] = [("as trained", y_true, proba)] + (
            [(f"temperature {temperature[name]:.2f}", y_true, scaled)] if scores[name]["calibrated"] else [])
    calibration.diagram(curves, RELIABILITY, f"reliability on {len(y_true)} test images")

    paired = mcnemar(y_true, probas["head"].argmax(1), probas["finetuned"].argmax(1))
    paired = {"head_only_right": paired.pop("a_only"), "finetuned_only_right": paired.pop("b_only"), **paired}
    scores["paired"] = {**paired, "verdict": test_scores.verdict(paired)}

    scores["val"] = audit.val_counts(manifest, classes)
    # which model to ship, judged on val alone
    scores["val_comparison"] = test_scores.val_comparison(head_cfg, manifest, temperature)
    splits = {s: load_split(s)[0] for s in ("train", "val")} | {"test": test}
    report = audit.duplicate_report(manifest, {s: (t["features"], t["ids"]) for s, t in splits.items()},
                                    pd.read_csv(DUPLICATES, dtype=str, keep_default_na=False),
                                    evaluate.near_duplicate_cosine)
    with atomic_path(TEST_DUPLICATES) as tmp:
        report.to_csv(tmp, index=False)
    scores["duplicates"] = audit.duplicate_counts(report)
    write_json(TEST_METRICS, scores)

    write_json(TEST_PER_CLASS, {name: per_class(y_true, pr, classes) for name, pr in probas.items()})
    test_scores.write_per_image(calibrated, manifest, test["ids"], y_true, classes)
    for line in test_scores.closing_lines(scores, list(probas), len(y_true), report):
        print(line)


if __name__ == "__main__":
    run_stage(main)
