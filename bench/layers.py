"""layers: what the probe on intermediate layers (head.layers, tlpipe.nets.layers) costs.

    python bench/layers.py [--sets sign-digits,hymenoptera] [--repeats 3] [--limit N] [--workdir DIR]

Targets (DESIGN.md §10): the features pass with every stage tapped and pooled (what the features
stage runs) at most 1.3x the time of the last layer alone; the head stage with head.layers: auto
under 90 s on sign-digits (Lite0, 128 px) on a quiet 2-core machine.

- features: in-process, tlpipe.nets.inference.outputs over the decode stage's shards (every split), the
  trunk alone against the trunk with its stages tapped (tlpipe.nets.layers.Tapped, as stages/features.py
  builds it), alternately, --repeats times each, the median counting (a shared machine is noisy);
  and the features stage's own time and the bytes it wrote, from metrics/features.json. --limit N
  times only each split's first N images (on a busy machine a full pass takes long; the ratio is
  what counts). With --workdir, a project whose features exist is reused (not rebuilt).
- head: `python -m stages.head` with head.layers: last and with auto (its `done in` time: reading the
  features, the CV over layer sets and L2, the final fit, writing), and the test accuracy of each head
  (the cached test features of its layers), with its 95 % interval.

sign-digits: a folder source (../shared/datasets/sign-digits/images, 70/15/15) at 128 px;
hymenoptera: presplit, the photo geometry (224 px from 256).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

import common
from common import HYMENOPTERA, Project, Section, Target, say, table
from tlpipe.manifest import SPLITS  # noqa: E402 (common puts this checkout's tlpipe first)

SIGN_DIGITS = HYMENOPTERA.parent / "sign-digits" / "images"
MAX_FEATURES_RATIO = 1.3
MAX_HEAD_SECONDS = 90.0
SETS = {
    "sign-digits": {"data.source": "folder", "data.root": str(SIGN_DIGITS),
                    "image.img_size": 128, "image.resize_size": 128},
    "hymenoptera": {"data.source": "presplit", "data.root": str(HYMENOPTERA), **common.PHOTO_GEOMETRY},
}


def features_pass(project: Project, model, limit: int | None) -> float:
    """Seconds of one in-process features pass over every split (as the stage, without writing)."""
    import itertools

    from tlpipe.ingest.decoded import DecodedSplit
    from tlpipe.nets import backbones, inference
    from tlpipe.runtime import inference_batch_size

    b = backbones.build(common.BACKBONE, pretrained=False)
    cpu = __import__("torch").device("cpu")
    with common.inside(project):
        start = time.perf_counter()
        batch = inference_batch_size(cpu)
        for split in SPLITS:
            batches = DecodedSplit(split).batches(batch)
            inference.outputs(model, itertools.islice(batches, None if limit is None else -(-limit // batch)),
                              b.mean, b.std, cpu, progress=False)
        return time.perf_counter() - start


def head_run(project: Project, setting) -> dict:
    """The head stage with head.layers = setting: its seconds, choice and test accuracy."""
    from safetensors.torch import load_file

    from tlpipe.nets import layers
    from tlpipe.report.metrics import wilson

    params = yaml.safe_load((project.path / "params.yaml").read_text())
    params["head"]["layers"] = setting
    (project.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    say(f"{project.label}: head stage, head.layers={setting} ...")
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _, out, err, code = common.run_monitored([sys.executable, "-m", "stages.head"], project.path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code:
        sys.exit(f"head failed in {project.path}:\n{out[-3000:]}\n{err[-3000:]}")
    seconds = float(err.rsplit("[head] done in ", 1)[1].split("s")[0]) if "[head] done in" in err else wall
    folder = project.path / "data" / "features"
    cfg = json.loads((project.path / "models" / "head.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    test = load_file(str(folder / "test.safetensors"))
    keys = layers.of_model(cfg)
    x = layers.concat(layers.read("test", keys, test, meta, folder), keys).double()
    head = load_file(str(project.path / "models" / "head.safetensors"))
    right = int(((x @ head["weight"].double().T + head["bias"].double()).argmax(1) == test["labels"]).sum())
    n = len(test["labels"])
    low, high = wilson(right, n)
    chosen = json.loads((project.path / "metrics" / "head.json").read_text())
    return {"seconds": seconds, "wall": wall, "cpu": cpu, "layers": chosen.get("layers", "last"), "dims": chosen.get("dims"),
            "right": right, "n": n, "low": low, "high": high}


def run(project: Project, repeats: int, limit: int | None) -> Section:
    from tlpipe.nets import backbones, layers

    if not (project.path / "data" / "features" / "meta.json").is_file():
        project.prepare("features")
    numbers = json.loads((project.path / "metrics" / "features.json").read_text())
    meta = json.loads((project.path / "data" / "features" / "meta.json").read_text())
    b = backbones.build(common.BACKBONE)
    names = [s["module"] for s in meta["layers"]["stages"]]
    keys = [layers.LAST, *meta["layers"]["dims"]]
    plain, tapped = copy.deepcopy(b.trunk), layers.Tapped(copy.deepcopy(b.trunk), names, keys)
    times = {"last layer only": [], "every stage tapped (1x1 + 2x2)": []}
    for r in range(repeats):
        say(f"{project.label}: features pass {r + 1}/{repeats} (last layer, then tapped) ...")
        times["last layer only"].append(features_pass(project, plain, limit))
        times["every stage tapped (1x1 + 2x2)"].append(features_pass(project, tapped, limit))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["every stage tapped (1x1 + 2x2)"] / median["last layer only"]
    n = numbers["images"]
    timed = n if limit is None else sum(min(limit, k) for k in split_sizes(project))
    section = Section(f"layers: {project.label} ({n} images, {project.params()['image']['img_size']} px, "
                      f"{common.BACKBONE})")
    rows = [[k, timed, f"{median[k]:.2f}", ", ".join(f"{t:.2f}" for t in v)] for k, v in times.items()]
    section.parts.append(table(["features pass (in-process, every split)", "images", "median s", "runs s"], rows))
    section.parts.append(f"The features stage itself (taps on): {numbers['seconds']:.1f} s for {n} images, "
                         f"last-layer files {numbers['last_layer_bytes'] / 2**20:.1f} MiB, layer files "
                         f"{numbers['layers_bytes'] / 2**20:.1f} MiB ({numbers['layer_keys']} layer keys).")
    heads = {setting: head_run(project, setting) for setting in ("last", "auto")}
    section.parts.append(table(
        ["head.layers", "chosen", "dims", "head stage s (done in)", "wall s", "CPU s (all threads)",
         "test accuracy (95 % interval)"],
        [[s, h["layers"], h["dims"], f"{h['seconds']:.1f}", f"{h['wall']:.1f}", f"{h['cpu']:.1f}",
          f"{h['right'] / h['n']:.3f} ({h['right']}/{h['n']}; {h['low']:.3f}-{h['high']:.3f})"]
         for s, h in heads.items()]))
    section.targets.append(Target(f"features with every stage tapped ({project.label})",
                                  f"<= {MAX_FEATURES_RATIO:g}x the last layer's time", f"{ratio:.2f}x",
                                  ratio <= MAX_FEATURES_RATIO, "in-process passes, median"))
    if project.label == "sign-digits":
        section.targets.append(Target("head stage, head.layers: auto (sign-digits, 128 px)",
                                      f"<= {MAX_HEAD_SECONDS:g} s", f"{heads['auto']['seconds']:.1f} s",
                                      heads["auto"]["seconds"] <= MAX_HEAD_SECONDS, "stage `done in` time"))
    return section


def split_sizes(project: Project) -> list[int]:
    meta = json.loads((project.path / "data" / "decoded" / "meta.json").read_text())
    return [sum(meta["splits"][s]["shards"]) for s in SPLITS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="sign-digits,hymenoptera", help="comma-separated: sign-digits, hymenoptera")
    parser.add_argument("--repeats", type=int, default=3, help="features passes of each kind (default 3)")
    parser.add_argument("--limit", type=int, help="time the features passes on each split's first N images")
    parser.add_argument("--workdir", type=Path, help="where projects are built (default: a temporary folder); "
                        "a project there whose features exist is reused")
    args = parser.parse_args()
    sections = []
    with common.Workdir(args.workdir) as workdir:
        for name in args.sets.split(","):
            if name not in SETS:
                sys.exit(f"unknown set {name!r} (sign-digits, hymenoptera)")
            if not Path(SETS[name]["data.root"]).is_dir():
                sys.exit(f"{name} not found: {SETS[name]['data.root']}")
            path = workdir / name
            project = (Project(path, name) if (path / "data" / "features" / "meta.json").is_file()
                       else Project.create(path, name, SETS[name]))
            sections.append(run(project, args.repeats, args.limit))
    for s in sections:
        print()
        print(s.markdown())
        print(common.targets_table(s.targets))


if __name__ == "__main__":
    main()
