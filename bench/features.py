"""features: tlpipe's features stage against the plain ImageFolder + DataLoader + model loop, and
against the backbone's own forward on tensors already in memory (the compute limit).

    python bench/features.py [--quick] [--n 5000] [--sets hymenoptera,synthetic] [--workdir DIR]

Targets (DESIGN.md §8): >= 2x the images/s of the plain loop on the same backbone, and >= 0.8x the
backbone's forward throughput on pre-decoded tensors. All images of the project (every split), the
same backbone and weights (tf_efficientnet_lite0), the same preprocessing.

- tlpipe, stage: `python -m stages.features` (its `done in` time: params, building the backbone,
  reading the decode stage's shards, the forward passes, writing the features). The decode stage
  is its own row: a one-off cost per geometry that stats, fine-tuning and inference share.
- tlpipe, hot loop: in-process, tlpipe.nets.inference.outputs over tlpipe.ingest.decoded.read_batches
  (reading shards, normalizing, channels_last forward): what compares with the compute limit.
- reference: reference.features_plain_loop (num_workers=0 as tutorials; also num_workers=2 on at
  most --subset images); compute limit: reference.forward_throughput, NCHW and channels_last, at
  batch 32 and at tlpipe's CPU batch size, best of 3 passes; the target uses the fastest of them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

import common
import reference
from common import BACKBONE, Project, Section, Target, say, table
from tlpipe.manifest import SPLITS  # noqa: E402 (common puts this checkout's tlpipe first)

SPEEDUP = 2.0
OF_LIMIT = 0.8
COMPUTE_LIMIT_IMAGES = 256  # pre-decoded images the forward alone is timed on (best of 3 passes)
# NCHW (the reference) and channels_last (tlpipe) run different oneDNN kernels, so float32 results
# differ in the last bits; identical pixels must agree to this.
MIN_COSINE = 0.9999
MAX_ABS = 1e-4
# The stage stores features as float16 (tlpipe.nets.features.stored): rounding to nearest moves a value
# by at most this fraction of itself, allowed on top of MAX_ABS.
STORED_ROUNDING = 2.0 ** -11


def stage_features(project: Project) -> dict[int, torch.Tensor]:
    """Features the stage wrote, by manifest row."""
    out = {}
    for split in SPLITS:
        t = load_file(str(project.path / "data" / "features" / f"{split}.safetensors"))
        out.update(zip(t["ids"].tolist(), t["features"].float()))
    return out


def compare(ours: dict[int, torch.Tensor], ref: torch.Tensor, ref_rows: list[int]) -> tuple[int, float, float]:
    """(images compared, max abs diff beyond float16 storage's rounding, min cosine) over the rows both have."""
    rows = [i for i, r in enumerate(ref_rows) if r in ours]
    a = torch.stack([ours[ref_rows[i]] for i in rows])
    b = ref[rows]
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    beyond = ((a - b).abs() - b.abs() * STORED_ROUNDING).clamp(min=0)
    return len(rows), beyond.max().item(), cosine.min().item()


def hot_loop(project: Project, trunk: torch.nn.Module, mean, std, splits=SPLITS,
             limit: int | None = None, dev: torch.device = torch.device("cpu")
             ) -> tuple[dict[int, torch.Tensor], float]:
    """tlpipe's in-process feature extraction over the decode stage's shards, on `dev` at the stage's
    batch size there (TLPIPE_BATCH_SIZE): (features by row, seconds). With `limit`, only the batches
    holding a split's first `limit` images."""
    import itertools
    import time

    from tlpipe.ingest.decoded import read_batches
    from tlpipe.nets.inference import outputs as extract_features
    from tlpipe.runtime import inference_batch_size

    def tap(batches, seen: list):
        for images, ids in batches:  # note each batch's manifest rows as it goes by
            seen.append(ids)
            yield images, ids

    batch = inference_batch_size(dev)
    out = {}
    with common.inside(project):
        start = time.perf_counter()
        for split in splits:
            seen = []
            batches = itertools.islice(read_batches(split, batch), None if limit is None else -(-limit // batch))
            features = extract_features(trunk, tap(batches, seen), mean, std, dev, progress=False)
            out.update(zip(torch.cat(seen).tolist(), features))
        seconds = time.perf_counter() - start
    return out, seconds


def run(project: Project, workdir: Path, args=None) -> Section:
    from tlpipe.nets import backbones
    from tlpipe.runtime import inference_batch_size

    subset = getattr(args, "subset", 1000)
    project.prepare("features")
    image = project.params()["image"]
    resize, size = image["resize_size"], image["img_size"]
    backbone = backbones.build(BACKBONE)
    mean, std = backbone.mean, backbone.std
    tree = common.image_folder_tree(project, workdir / f"{project.label}-all-tree", SPLITS)
    ours = stage_features(project)
    n = len(ours)
    rows = []

    decode, stage = project.runs.get("decode"), project.runs["features"]
    stage_ips = n / stage.seconds
    if decode:
        rows.append([f"tlpipe: decode stage (jpeg_draft={project.jpeg_draft()}; one-off per geometry)",
                     n, decode.seconds, n / decode.seconds, ""])
    rows.append(["tlpipe: features stage" + (" (from the shards)" if decode else ""), n, stage.seconds,
                 stage_ips, f"wall {stage.wall:.1f}s"])
    if decode:
        both = decode.seconds + stage.seconds
        rows.append(["tlpipe: decode + features, end to end", n, both, n / both, ""])
    hot_ips = None
    if decode:
        say(f"{project.label}: tlpipe hot loop (in-process, from the shards) ...")
        _, hot_seconds = hot_loop(project, copy.deepcopy(backbone.trunk), mean, std)
        hot_ips = n / hot_seconds
        rows.append([f"tlpipe: hot loop, in-process (shards, batch {inference_batch_size()}, channels_last)",
                     n, hot_seconds, hot_ips, ""])

    say(f"{project.label}: reference plain loop over {n} images (batch 32, num_workers=0) ...")
    ref, ref_paths, ref_seconds = reference.features_plain_loop(
        tree, copy.deepcopy(backbone.trunk), resize, size, mean, std)
    ref_rows = [common.row_of(p) for p in ref_paths]
    ref_ips = n / ref_seconds
    rows.append(["reference: ImageFolder + DataLoader(batch_size=32) + model, num_workers=0", n,
                 ref_seconds, ref_ips, "in-process"])
    k = min(n, subset)
    say(f"{project.label}: reference plain loop, num_workers=2, first {k} images ...")
    _, _, ref2_seconds = reference.features_plain_loop(tree, copy.deepcopy(backbone.trunk), resize, size,
                                                        mean, std, num_workers=2, limit=k)
    rows.append(["reference: the same, num_workers=2", k, ref2_seconds, k / ref2_seconds, "in-process"])

    say(f"{project.label}: compute limit (forward only, {COMPUTE_LIMIT_IMAGES} images in memory) ...")
    inputs = reference.decoded_inputs(tree, resize, size, mean, std, COMPUTE_LIMIT_IMAGES)
    limits = []
    for channels_last in (False, True):
        for batch in sorted({32, inference_batch_size()}):
            ips = reference.forward_throughput(copy.deepcopy(backbone.trunk), inputs, batch, channels_last)
            layout = "channels_last" if channels_last else "NCHW"
            limits.append((ips, f"{layout}, batch {batch}"))
            rows.append([f"compute limit: forward on tensors in memory, {layout}, batch {batch}",
                         len(inputs), len(inputs) / ips, ips, "in-process"])
    best_ips, best_name = max(limits)

    section = Section(f"features: {project.label} ({n} images, {resize}/{size} px, {BACKBONE})")
    section.parts.append(table(["run", "images", "seconds", "images/s", "note"], rows))
    section.parts.append("Seconds of a stage: its own `done in` time (params, building the backbone, "
                         "reading, computing, writing; not Python start-up). The reference loops are "
                         "timed in-process from building the ImageFolder to the last batch (not building "
                         "the model); the compute limit times the forward passes alone after one warm-up "
                         "batch, best of 3 passes over the images.")

    # Agreement: tlpipe's features against the plain loop's, image by image.
    agree = []
    count, max_abs, min_cos = compare(ours, ref, ref_rows)
    exact = (count, max_abs, min_cos)
    agree.append(["features stage" + (f", jpeg_draft={project.jpeg_draft()}" if decode else ""),
                  count, f"{max_abs:.2e}", f"{min_cos:.6f}"])
    if project.jpeg_draft():
        # The agreement check proper: the same pixels as the reference (jpeg_draft off), tlpipe's
        # hot loop over the first train images of a no-draft decode.
        nodraft = project.variant("no-draft", {"image.jpeg_draft": False, "image.decoded_quality": 0})  # exact pixels
        nodraft.prepare("decode")
        say(f"{project.label}: features of the jpeg_draft=False shards, first {k} train images ...")
        exact_features, _ = hot_loop(nodraft, copy.deepcopy(backbone.trunk), mean, std, ("train",), limit=k)
        exact = compare(exact_features, ref, ref_rows)
        agree.append(["hot loop, jpeg_draft=False (first train images)", exact[0], f"{exact[1]:.2e}",
                      f"{exact[2]:.6f}"])
    section.parts.append(table(["tlpipe features vs the plain loop's", "images", "max abs diff beyond float16 rounding",
                                "min cosine"], agree))
    section.parts.append(f"Identical pixels must agree to max abs diff <= {MAX_ABS:g} and cosine >= "
                         f"{MIN_COSINE} (NCHW and channels_last kernels round differently in float32), beyond the stored "
                         "features' float16 rounding (at most 2^-11 of each value). "
                         + ("jpeg_draft=True decodes large JPEGs at reduced DCT scale: slightly different "
                            "pixels, so its row is reported, not judged." if project.jpeg_draft() else ""))

    section.targets.append(Target(f"features vs plain loop ({project.label})", f">= {SPEEDUP:g}x images/s",
                                  f"{stage_ips / ref_ips:.2f}x ({stage_ips:.1f} vs {ref_ips:.1f} img/s)",
                                  stage_ips >= SPEEDUP * ref_ips,
                                  "features stage" + (" from the shards" if decode else "")))
    if decode:
        both_ips = n / (decode.seconds + stage.seconds)
        section.targets.append(Target(f"decode + features vs plain loop ({project.label})", "(informational)",
                                      f"{both_ips / ref_ips:.2f}x", None,
                                      "end to end, the decode paid once for all stages"))
    ours_ips, which = (hot_ips, "in-process hot loop") if hot_ips else (stage_ips, "features stage")
    section.targets.append(Target(f"features vs compute limit ({project.label})", f">= {OF_LIMIT:g}x",
                                  f"{ours_ips / best_ips:.2f}x ({ours_ips:.1f} vs {best_ips:.1f} img/s)",
                                  ours_ips >= OF_LIMIT * best_ips, f"{which} vs the fastest forward ({best_name})"))
    section.targets.append(Target(f"features agree ({project.label})",
                                  f"max abs <= {MAX_ABS:g}, cosine >= {MIN_COSINE}",
                                  f"{exact[1]:.1e}, {exact[2]:.6f}",
                                  exact[1] <= MAX_ABS and exact[2] >= MIN_COSINE,
                                  "jpeg_draft off" if project.jpeg_draft() else ""))
    return section


def extra_args(parser) -> None:
    parser.add_argument("--subset", type=int, default=1000,
                        help="images for the num_workers=2 reference and the jpeg_draft=False check (default 1000)")


if __name__ == "__main__":
    common.standalone(run, __doc__.splitlines()[0], extra_args)
