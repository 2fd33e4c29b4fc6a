"""Data problems found from the cached features: suspect labels, near-duplicates, a val too small.

- Suspect labels, confident-learning style (Northcutt et al. 2021, what cleanlab's
  `find_label_issues` does by default, in a few lines): from out-of-fold probabilities, each class
  j gets a threshold t_j, the mean probability of j over the images labelled j. An image is
  confidently of class j when p_j >= t_j; one confidently of a class other than its given label
  (the most probable such class) is a suspect. Suspects are ranked by the probability of their
  given label, lowest first.
- Near-duplicates across splits: cosine similarity of centred backbone features (the mean training
  feature subtracted: raw pooled features are all positive, so raw cosines crowd near 1). A resized
  or re-encoded copy, which sha256 misses, lands near 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

MIN_VAL_PER_CLASS = 20  # below this many val images in a class, val-based choices rest on noise


def suspect_labels(proba: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Rows (index, suspected, given_probability, suspected_probability), most suspect first."""
    n, n_classes = proba.shape
    thresholds = np.array([proba[labels == j, j].mean() if (labels == j).any() else 1.0
                           for j in range(n_classes)])
    confident = np.where(proba >= thresholds, proba, -1.0)
    suspected = confident.argmax(1)
    flagged = (confident.max(1) >= 0) & (suspected != labels)
    idx = np.flatnonzero(flagged)
    table = pd.DataFrame({"index": idx, "suspected": suspected[idx],
                          "given_probability": proba[idx, labels[idx]],
                          "suspected_probability": proba[idx, suspected[idx]]})
    return table.sort_values(["given_probability", "index"], kind="stable").reset_index(drop=True)


def near_duplicates(features: dict[str, torch.Tensor], threshold: float, chunk: int = 2048):
    """Pairs of images in different splits whose centred-feature cosine is >= threshold.

    `features`: split name -> (N x D). Returns (split_a, i, split_b, j, cosine) tuples, i and j
    row numbers within their splits, highest cosine first.
    """
    centre = features["train"].double().mean(0)
    unit = {s: torch.nn.functional.normalize(f.double() - centre, dim=1).float() for s, f in features.items()}
    names = list(unit)
    pairs = []
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1:]:
            for start in range(0, len(unit[a]), chunk):
                sims = unit[a][start:start + chunk] @ unit[b].T
                for i, j in (sims >= threshold).nonzero().tolist():
                    pairs.append((a, start + i, b, j, round(float(sims[i, j]), 6)))
    return sorted(pairs, key=lambda p: -p[4])


def exact_pairs(duplicates: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
    """Pairs of files with the same sha256 (data/prepared/duplicates.csv rows), each pair once."""
    pairs = []
    for _, group in duplicates.groupby("sha256", sort=True):
        rows = [r for _, r in group.iterrows()]
        pairs += [(rows[i], rows[k]) for i in range(len(rows)) for k in range(i + 1, len(rows))]
    return pairs


def describe(report: pd.DataFrame) -> list[str]:
    """Warning lines: copies across splits, by split pair and kind; label conflicts on their own."""
    lines = []
    across = report[report["split_a"] != report["split_b"]]
    if len(across):
        parts = []
        for splits, group in across.groupby("splits", sort=True):
            kinds = group["kind"].value_counts()
            parts.append(f"{splits}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        leak = "train/test leakage inflates test scores" if across["splits"].str.contains("test").any() \
            else "copies between train and val make val-based choices optimistic"
        lines.append(f"warning: {len(across)} image pair(s) are copies across splits ({'; '.join(parts)}): "
                     f"{leak}")
    conflicts = report[report["conflict"]]
    if len(conflicts):
        first = conflicts.iloc[0]
        lines.append(f"warning: {len(conflicts)} duplicate pair(s) carry different labels (label conflicts), "
                     f"e.g. {first['path_a']} ({first['label_a']}) and {first['path_b']} ({first['label_b']})")
    return lines


def val_counts(manifest: pd.DataFrame, classes: list[str]) -> dict:
    """Val images per class; `val_too_small` when any class has fewer than MIN_VAL_PER_CLASS."""
    counts = manifest[manifest["split"] == "val"]["label"].value_counts()
    smallest = min(int(counts.get(c, 0)) for c in classes)
    return {"val_images": int(counts.sum()), "val_min_per_class": smallest,
            "val_too_small": smallest < MIN_VAL_PER_CLASS}


def val_warning(counts: dict) -> str:
    """The warning line for a val split below MIN_VAL_PER_CLASS (`counts`: val_counts' dict)."""
    return (f"warning: val has {counts['val_min_per_class']} image(s) in its smallest class (< {MIN_VAL_PER_CLASS}): "
            "too few to choose an epoch, so fine-tuning kept its last (docs/finetuning.md); val-based "
            "choices and scores rest on few images (docs/trust.md)")


def duplicate_report(manifest: pd.DataFrame, split_features: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     exact: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Exact copies (sha256, from the data stage) and near-duplicates across splits, one row per pair.

    `split_features`: split -> (features, manifest row ids). A pair found both ways is reported as
    exact. `conflict`: the two images carry different labels.
    """
    rows = []

    def add(kind, a, b, cosine):
        rows.append({"kind": kind, "cosine": cosine, "path_a": a["path"], "split_a": a["split"],
                     "label_a": a["label"], "path_b": b["path"], "split_b": b["split"], "label_b": b["label"]})

    exact_paths = set()
    for a, b in exact_pairs(exact):
        add("exact", a, b, 1.0)
        exact_paths.add(frozenset((a["path"], b["path"])))
    present = {s: v for s, v in split_features.items() if len(v[0])}
    if "train" in present and len(present) > 1:
        for sa, i, sb, j, cos in near_duplicates({s: f for s, (f, _) in present.items()}, threshold):
            a, b = manifest.loc[int(present[sa][1][i])], manifest.loc[int(present[sb][1][j])]
            if frozenset((a["path"], b["path"])) not in exact_paths:
                add("near", a, b, cos)
    table = pd.DataFrame(rows, columns=["kind", "cosine", "path_a", "split_a", "label_a", "path_b", "split_b",
                                        "label_b"])
    table["splits"] = ["/".join(sorted({a, b})) for a, b in zip(table["split_a"], table["split_b"])]
    table["conflict"] = table["label_a"] != table["label_b"]
    return table


def duplicate_counts(report: pd.DataFrame) -> dict[str, int]:
    across = report["split_a"] != report["split_b"]
    counts = {f"{kind}_across_splits": int((across & (report["kind"] == kind)).sum()) for kind in ("exact", "near")}
    for splits in ("train/test", "train/val", "test/val"):
        counts[f"across_{splits.replace('/', '_')}"] = int((report["splits"] == splits).sum())
    counts["label_conflicts"] = int(report["conflict"].sum())
    return counts
