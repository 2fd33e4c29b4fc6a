"""`tlpipe compare`: which experiment to keep. Markdown on stdout, one self-contained HTML report.

Built on `dvc exp show --json` (params and metrics of the baseline commit and its experiments);
files of an experiment are read at its git revision with DVC's file system, which serves
git-tracked files (the fine-tuning curves) from git and DVC-tracked ones (the per-image
predictions) from the local DVC cache. Figures are matplotlib PNGs embedded as base64, so the
report is a single file that can be mailed or attached to a pull request.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlpipe import paths
from tlpipe.runtime import TlpipeError

# Files are named as `dvc exp show` and DVC's file system name them: their paths as dvc.yaml spells them.
CURVES = paths.FINETUNE_CURVE_FILES.as_posix()
CURVE_FILES = {"train loss": "train/loss.tsv", "val loss": "val/loss.tsv", "val accuracy": "val/accuracy.tsv"}
MODELS = ("head", "finetuned")
PREDICTIONS = {m: (paths.TEST_PREDICTIONS / f"{m}.csv").as_posix() for m in MODELS}
GALLERIES = {m: (paths.GALLERY / f"{m}.png").as_posix() for m in MODELS}
MANIFEST = paths.MANIFEST.as_posix()
DATA_JSON, FEATURES_JSON, HEAD_JSON, FINETUNE_JSON, TEST_JSON, SCRATCH_JSON = (p.as_posix() for p in (
    paths.DATA_METRICS, paths.FEATURES_METRICS, paths.HEAD_METRICS, paths.FINETUNE_METRICS, paths.TEST_METRICS,
    paths.SCRATCH_METRICS))


@dataclass
class Experiment:
    name: str
    rev: str  # full git sha, or "workspace"
    params: dict[str, object]
    metrics: dict[str, dict[str, object]]  # metrics file -> flat {dotted key: value}
    notes: list[str] = field(default_factory=list)
    # What the test metrics were measured on: the hash of the data stage's manifest (every image's
    # path, label, split and sha256); None when DVC does not know it.
    manifest: str | None = None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _experiment(name: str, rev: str, data: dict) -> Experiment:
    params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
    metrics = {file: flatten(entry.get("data") or {}) for file, entry in (data.get("metrics") or {}).items()}
    manifest = ((data.get("deps") or {}).get(MANIFEST) or {}).get("hash")
    return Experiment(name, rev, params, metrics, manifest=manifest)


def load_experiments(selected: list[str], repo: Path = Path(".")) -> list[Experiment]:
    """The baseline commit and its finished experiments (or the `selected` ones, by name or rev)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TlpipeError(f"dvc exp show failed: {last}")
    rows = json.loads(proc.stdout)
    found: list[Experiment] = []
    skipped = []
    for commit in rows:
        if commit["rev"] == "workspace":
            if "workspace" in selected:
                found.append(_experiment("workspace", "workspace", commit["data"]))
            continue
        if commit.get("data"):
            found.append(_experiment(commit.get("name") or commit["rev"][:7], commit["rev"], commit["data"]))
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            # Queued, running and failed experiments have no results to compare; a finished queued
            # one keeps its executor record, with state "success".
            state = (exp.get("executor") or {}).get("state", "success")
            if state != "success" or rev.get("error") or not (rev.get("data") or {}).get("metrics"):
                skipped.append(exp.get("name") or rev["rev"][:7])
                continue
            found.append(_experiment(exp.get("name") or rev["rev"][:7], rev["rev"], rev["data"]))
    if skipped:
        print(f"note: not finished (queued, running or failed), left out: {', '.join(skipped)}", file=sys.stderr)
    if not selected:
        return found
    chosen = []
    for want in selected:
        match = [e for e in found if want in (e.name, e.rev) or (len(want) >= 7 and e.rev.startswith(want))]
        if not match:
            known = ", ".join(e.name for e in found) or "none"
            raise TlpipeError(f"compare: no finished experiment {want!r} (known: {known})")
        chosen.append(match[0])
    return chosen


# --- tables -------------------------------------------------------------------------------------

def direction(column: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither (counts, chosen L2, epochs)."""
    leaf = column.rsplit(".", 1)[-1].split(":")[-1]
    if "loss" in leaf:
        return -1
    if "accuracy" in leaf or "f1" in leaf:
        return 1
    return 0


def differing_params(exps: list[Experiment]) -> pd.DataFrame:
    keys = sorted({k for e in exps for k in e.params})
    keep = [k for k in keys if len({json.dumps(e.params.get(k)) for e in exps}) > 1]
    return pd.DataFrame([[e.params.get(k, "-") for k in keep] for e in exps], index=[e.name for e in exps],
                        columns=keep)


def headline(exps: list[Experiment]) -> pd.DataFrame:
    """The columns to decide on: test accuracy, macro-F1 and log loss of every model, val accuracy."""
    rows = []
    for e in exps:
        test = e.metrics.get(TEST_JSON, {})
        row = {k: v for k, v in test.items() if k.split(".")[-1] in ("accuracy", "macro_f1", "log_loss")
               and k.split(".")[0] in MODELS}
        scratch = e.metrics.get(SCRATCH_JSON, {})
        row.update({k: v for k, v in scratch.items() if k in ("scratch.accuracy", "scratch.macro_f1",
                                                               "scratch.log_loss")})
        if "val_accuracy" in e.metrics.get(HEAD_JSON, {}):
            row["head.val_accuracy"] = e.metrics[HEAD_JSON]["val_accuracy"]
        finetune = e.metrics.get(FINETUNE_JSON, {})
        if "val_accuracy" in finetune:
            row["finetuned.val_accuracy"] = finetune["val_accuracy"]
        if finetune.get("beats_probe_on_val") is not None:  # kept by val loss: did any epoch beat the probe
            row["finetuned.beats_probe_on_val"] = finetune["beats_probe_on_val"]
        if test.get("val_comparison.ship") is not None:  # the model val says to ship (evaluate)
            row["ship (by val)"] = test["val_comparison.ship"]
        if "search" in finetune:  # finetune.recipe auto: the candidate chosen, and what the search cost
            row["finetuned.recipe"] = finetune["search"].get("chosen")
            row["finetuned.search_seconds"] = finetune["search"].get("seconds")
            if "fraction_of_final_run" in finetune["search"]:  # its wall time / the full run's
                row["finetuned.search_fraction"] = finetune["search"]["fraction_of_final_run"]
        rows.append(row)
    return pd.DataFrame(rows, index=[e.name for e in exps])


def leaderboard(exps: list[Experiment]) -> tuple[pd.DataFrame, str]:
    """Backbones ranked by the linear probe's val accuracy, then its test accuracy (the probe on the
    layers head.layers chose, when it reads more than the last), with the time the
    features stage spent per image; ('', empty) unless the experiments use more than one backbone.
    Only experiments on the same data (data.* params) are ranked together."""
    if len({e.params.get("backbone.name") for e in exps}) < 2:
        return pd.DataFrame(), ""
    rows, data_of = [], {}
    for e in exps:
        test = e.metrics.get(TEST_JSON, {})
        features = e.metrics.get(FEATURES_JSON, {})
        rows.append({"backbone": e.params.get("backbone.name"),
                     "img_size": e.params.get("image.img_size"),
                     # with head.cv_folds the probe is chosen by cross-validation: its held-out accuracy
                     "probe val accuracy": e.metrics.get(HEAD_JSON, {}).get(
                         "val_accuracy", e.metrics.get(HEAD_JSON, {}).get("cv_accuracy")),
                     "probe test accuracy": test.get("head.accuracy"),
                     # the layers the probe reads (head.layers; tlpipe.nets.layers): the ranking is by that probe
                     "probe layers": e.metrics.get(HEAD_JSON, {}).get("layers", "last"),
                     "fine-tuned test accuracy": test.get("finetuned.accuracy"),
                     "fine-tuning epochs": e.metrics.get(FINETUNE_JSON, {}).get("epochs_run"),
                     "features ms/image": features.get("ms_per_image"),
                     "features device": features.get("device")})
        data_of[e.name] = json.dumps({k: v for k, v in e.params.items() if k.startswith("data.")}, sort_keys=True)
    table = pd.DataFrame(rows, index=[e.name for e in exps])
    if len(set(data_of.values())) > 1:
        return table, ("not ranked: these experiments use different data (data.* params differ); "
                       "compare backbones on one dataset")
    order = table.sort_values(["probe val accuracy", "probe test accuracy"], ascending=False,
                              na_position="last").index
    return table.loc[order], ""


def _interval(test: dict, key: str) -> str:
    if key not in test:
        return "-"
    if f"{key}_low" not in test:
        return _fmt(test[key])
    return f"{_fmt(test[key])} [{_fmt(test[f'{key}_low'])}, {_fmt(test[f'{key}_high'])}]"


def trust_table(exps: list[Experiment]) -> pd.DataFrame:
    """How sure each experiment's numbers are: 95 % intervals, the paired verdict, calibration."""
    rows = []
    for e in exps:
        test = e.metrics.get(TEST_JSON, {})
        row = {f"{m} {k}": _interval(test, f"{m}.{k}") for m in MODELS for k in ("accuracy", "log_loss")}
        if "paired.verdict" in test:
            row["head vs fine-tuned (exact McNemar)"] = (
                f"{test['paired.verdict']} (p = {_fmt(test['paired.p_value'])}; right by one model only: "
                f"head {test['paired.head_only_right']}, fine-tuned {test['paired.finetuned_only_right']})")
        for m in MODELS:
            if f"{m}.ece" in test and test.get(f"{m}.calibrated") in (False, "false"):  # T = 1 (docs/trust.md)
                row[f"{m} ECE, calibrated"] = f"{_fmt(test[f'{m}.ece'])}, not calibrated (T = 1)"
            elif f"{m}.ece" in test:
                row[f"{m} ECE, calibrated"] = f"{_fmt(test[f'{m}.ece'])} -> {_fmt(test[f'{m}.ece_calibrated'])}"
        if test.get("val.val_too_small"):
            row["val"] = f"too small ({test['val.val_min_per_class']} in its smallest class)"
        rows.append(row)
    return pd.DataFrame(rows, index=[e.name for e in exps])


def metrics_file_table(exps: list[Experiment], file: str) -> pd.DataFrame:
    return pd.DataFrame([e.metrics.get(file, {}) for e in exps], index=[e.name for e in exps])


def data_groups(exps: list[Experiment]) -> list[list[str]]:
    """Names of the experiments evaluated on the same data, group by group, in order of appearance.

    Same data means the same manifest (images, labels and split); without its hash, the same data.*
    params and seed. Test metrics on different data do not rank: a digits score says nothing
    against an ants/bees one.
    """
    groups: dict[str, list[str]] = {}
    for e in exps:
        key = e.manifest or json.dumps({k: v for k, v in e.params.items()
                                        if k == "seed" or k.startswith("data.")}, sort_keys=True)
        groups.setdefault(key, []).append(e.name)
    return list(groups.values())


def describe_data(exp: Experiment) -> str:
    counts = exp.metrics.get(DATA_JSON, {})
    parts = [str(exp.params.get("data.source", "?"))]
    if exp.params.get("data.source") not in (None, "digits"):
        parts.append(str(exp.params.get(f"data.{'url' if exp.params.get('data.source') == 'url' else 'root'}")))
    for key, what in (("classes", "classes"), ("test_images", "test images")):
        if key in counts:
            parts.append(f"{_fmt(counts[key])} {what}")
    if "seed" in exp.params:
        parts.append(f"seed {exp.params['seed']}")
    return ", ".join(parts)


def data_note(exps: list[Experiment], groups: list[list[str]]) -> str | None:
    """One line when the experiments ran on different data, naming the groups; None otherwise."""
    if len(groups) < 2:
        return None
    by_name = {e.name: e for e in exps}
    listed = "; ".join(f"data {i}: {', '.join(g)} ({describe_data(by_name[g[0]])})"
                       for i, g in enumerate(groups, start=1))
    return (f"{len(groups)} data sets (images, labels or split differ); best values are marked only "
            f"within each. {listed}")


def best_mask(table: pd.DataFrame, groups: list[list[str]] | None = None) -> pd.DataFrame:
    """True where a value is the best of its column (all ties marked) among the rows of its group
    (default: all rows); only where values differ."""
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    for rows in groups or [list(table.index)]:
        rows = [r for r in rows if r in table.index]
        for col in table.columns:
            sign = direction(col)
            values = pd.to_numeric(table.loc[rows, col], errors="coerce")
            if sign == 0 or values.notna().sum() < 2 or values.nunique() < 2:
                continue
            best = values.max() if sign > 0 else values.min()
            mask.loc[rows, col] = np.isclose(values, best, rtol=0, atol=1e-12) & values.notna()
    return mask


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # counts and epochs: pandas turns ints into floats beside missing cells
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(table: pd.DataFrame, mark_best: bool, groups: list[list[str]] | None = None) -> str:
    mask = best_mask(table, groups) if mark_best else None
    lines = ["| Experiment | " + " | ".join(table.columns) + " |",
             "|---|" + "---:|" * len(table.columns)]
    for name, row in table.iterrows():
        cells = []
        for col in table.columns:
            text = _fmt(row[col])
            cells.append(f"**{text}**" if mask is not None and mask.at[name, col] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(table: pd.DataFrame, mark_best: bool, groups: list[list[str]] | None = None) -> str:
    mask = best_mask(table, groups) if mark_best else None
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for name, row in table.iterrows():
        cells = "".join(
            f'<td class="{"best" if mask is not None and mask.at[name, col] else ""}">{html.escape(_fmt(row[col]))}</td>'
            for col in table.columns)
        body.append(f"<tr><th>{html.escape(str(name))}</th>{cells}</tr>")
    return f"<table><tr><th>experiment</th>{head}</tr>{''.join(body)}</table>"


# --- files at an experiment's revision ----------------------------------------------------------

class Files:
    """Read a repository file as of an experiment: git-tracked from git, DVC-tracked from the cache."""

    def __init__(self, repo: Path):
        self.repo, self._fs = repo, {}

    def read(self, exp: Experiment, path: str) -> bytes | None:
        try:
            if exp.rev == "workspace":
                return (self.repo / path).read_bytes()
            if exp.rev not in self._fs:
                from dvc.api import DVCFileSystem
                self._fs[exp.rev] = DVCFileSystem(str(self.repo), rev=exp.rev)
            with self._fs[exp.rev].open(path, "rb") as f:
                return f.read()
        except Exception:  # missing in that revision, or not in the local cache: both mean "unavailable"
            return None


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def curves_figure(exps: list[Experiment], files: Files) -> tuple[str | None, list[str]]:
    fig = Figure(figsize=(4.2 * len(CURVE_FILES), 3.4))
    axes = fig.subplots(1, len(CURVE_FILES), squeeze=False)[0]
    missing, drawn = [], 0
    for ax, (title, rel) in zip(axes, CURVE_FILES.items()):
        for i, exp in enumerate(exps):
            raw = files.read(exp, f"{CURVES}/{rel}")
            if raw is None:
                missing.append(f"{exp.name}: {rel}")
                continue
            df = pd.read_csv(io.BytesIO(raw), sep="\t")
            ax.plot(df["step"], df.iloc[:, -1], marker="o", ms=3, color=f"C{i % 10}", label=exp.name)
            drawn += 1
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = the head before fine-tuning)", fontsize=8)
    if not drawn:
        return None, missing
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return png(fig), missing


def confusion_figure(exp: Experiment, files: Files) -> tuple[str | None, str | None]:
    tables = {}
    for model, rel in PREDICTIONS.items():
        raw = files.read(exp, rel)
        if raw is not None:
            tables[model] = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    if not tables:
        return None, (f"{exp.name}: per-image predictions not in the local DVC cache "
                      "(`dvc pull` or `dvc exp pull <remote> <exp>`), confusion matrices skipped")
    labels = sorted({v for t in tables.values() for v in pd.concat([t["actual"], t["predicted"]])})
    index = {c: i for i, c in enumerate(labels)}
    fig = Figure(figsize=(4.2 * len(tables), 3.8))
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, (model, t) in zip(axes, tables.items()):
        counts = np.zeros((len(labels), len(labels)), dtype=int)
        np.add.at(counts, (t["actual"].map(index).to_numpy(), t["predicted"].map(index).to_numpy()), 1)
        rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # row-normalized: recall per class
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if len(labels) <= 20:
            for (r, c), n in np.ndenumerate(counts):
                ax.text(c, r, str(n), ha="center", va="center", fontsize=7,
                        color="white" if rates[r, c] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        acc = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{model} (accuracy {acc:.3f})", fontsize=9)
    fig.suptitle(exp.name, fontsize=10)
    fig.tight_layout()
    note = None if len(tables) == len(PREDICTIONS) else f"{exp.name}: predictions of one model unavailable"
    return png(fig), note


# --- the report ---------------------------------------------------------------------------------

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}td.best{font-weight:bold;background:#dfd}
.note{color:#a60}img{max-width:100%}"""


def report(exps: list[Experiment], repo: Path = Path("."), out: Path = Path("compare.html")) -> str:
    """Write the HTML report to `out`; return the Markdown summary."""
    if not exps:
        raise TlpipeError("compare: no finished experiments (run `dvc exp run` first)")
    from tlpipe.io import write_text

    files = Files(repo)
    params = differing_params(exps)
    main = headline(exps)
    groups = data_groups(exps)
    different = data_note(exps, groups)
    if different:  # say which data each row ran on, beside its scores
        main.insert(0, "data", [next(i for i, g in enumerate(groups, 1) if e.name in g) for e in exps])
    best = "best per column in bold" + (" among experiments on the same data" if different else "")
    names = ", ".join(e.name for e in exps)
    md = [f"# Experiments: {names}", "", "## Params that differ", ""]
    md.append(markdown_table(params, mark_best=False) if len(params.columns) else "(none: same params)")
    sure = trust_table(exps)
    if len(sure.columns):
        md += ["", "## How sure: 95 % intervals, head vs fine-tuned, calibration (docs/trust.md)", "",
               markdown_table(sure, mark_best=False)]
    md += ["", f"## Test metrics ({best}; higher is better, lower for log loss)", ""]
    md += [f"Different data: {different}", ""] if different else []
    md += [markdown_table(main, mark_best=True, groups=groups), ""]

    parts = [f"<h1>Experiments: {html.escape(names)}</h1>", "<h2>Params that differ</h2>",
             html_table(params, False) if len(params.columns) else "<p>none: same params</p>",
             f"<h2>Test metrics</h2><p>{best.capitalize().replace(' in bold', ' highlighted')}: "
             "higher is better for accuracy and F1, lower for loss.</p>"]
    parts += [f'<p class="note">Different data: {html.escape(different)}</p>'] if different else []
    parts += [html_table(main, True, groups),
              "<h2>How sure: 95 % intervals, head vs fine-tuned, calibration</h2>", html_table(sure, False),
              "<h2>All metrics</h2>"]
    board, board_note = leaderboard(exps)
    board_title = ("Backbones, ranked by linear-probe val accuracy (then test); features time per image "
                   f"as measured on the machine that ran each ({FEATURES_JSON})")
    if len(board):
        md += [f"## {board_title}", "", markdown_table(board, mark_best=not board_note), ""]
        md += [f"> {board_note}", ""] if board_note else []
        parts[3:3] = [f"<h2>{html.escape(board_title)}</h2>", html_table(board, not board_note),
                      f"<p class='note'>{html.escape(board_note)}</p>" if board_note else ""]
    for file in sorted({f for e in exps for f in e.metrics}):
        parts += [f"<h3>{html.escape(file)}</h3>", html_table(metrics_file_table(exps, file), True, groups)]

    notes = []
    curves, missing = curves_figure(exps, files)
    parts.append("<h2>Fine-tuning curves</h2>")
    parts.append(f'<img src="data:image/png;base64,{curves}">' if curves else "<p>no curves found</p>")
    if missing:
        notes.append("fine-tuning curves missing for " + "; ".join(missing))
    parts.append("<h2>Confusion matrices (test; colour: share of the actual class, numbers: counts)</h2>")
    for exp in exps:
        image, note = confusion_figure(exp, files)
        if image:
            parts.append(f'<img src="data:image/png;base64,{image}">')
        if note:
            notes.append(note)
            parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("<h2>Misclassified test images</h2>")
    for exp in exps:
        for model, rel in GALLERIES.items():
            raw = files.read(exp, rel)
            if raw is not None:
                parts.append(f"<h3>{html.escape(exp.name)}: {model}</h3>"
                             f'<img src="data:image/png;base64,{base64.b64encode(raw).decode()}">')
    if notes:
        parts.insert(1, "<div class='note'>" + "<br>".join(html.escape(n) for n in notes) + "</div>")
    write_text(out, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tlpipe compare</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    md += [f"Report with all metrics, fine-tuning curves and confusion matrices: {out}"]
    md += [f"> note: {n}" for n in notes]
    return "\n".join(md)
