"""A deterministic, labelled folder dataset of mixed-size JPEGs for the benchmarks.

    python bench/synthetic.py [--n 5000] [--out DIR] [--seed 0]

Ten classes (five shapes x two colours) on textured, noisy backgrounds, with clutter, partial
transparency and colour jitter, so a linear probe on pretrained features learns them well but not
perfectly. Sizes are what photo folders really hold: short sides drawn from 240 to 1800 px, portrait
and landscape, mostly JPEG at quality 90, a few grayscale JPEGs and PNGs. Large images matter: they
are what makes decoding, not the network, the cost of a naive loop.

Image i depends only on (seed, i), so the first k images of a larger set equal a set of k.
Output (default ~/.cache/tlpipe-bench/synthetic-N, outside any project): <class>/<i>.jpg|png and
labels.csv (file,label, for csv-source subsets). A marker file with the generator version makes a
complete set reused as is; an incomplete one is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2  # bump when the images change, so cached sets are regenerated
MARKER = ".tlpipe-synthetic.json"
SHORT_SIDES = (240, 480, 768, 1200, 1800)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200)}
CLASSES = [f"{s}_{c}" for s in SHAPES for c in COLOURS]


def default_dir(n: int) -> Path:
    return Path.home() / ".cache" / "tlpipe-bench" / f"synthetic-{n}"


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
               for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:  # circle: a 48-gon is round at any size used here
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(48) * 2 * math.pi / 48]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.normal(0, amount), 0, 255)) for v in rgb)


def make_image(i: int, seed: int) -> tuple[Image.Image, str, str]:
    """Image i: (PIL image, class name, file suffix)."""
    rng = np.random.default_rng([seed, i])
    label = CLASSES[i % len(CLASSES)]
    shape, colour = label.rsplit("_", 1)
    short = int(rng.choice(SHORT_SIDES))
    long = round(short * float(rng.choice(ASPECTS)))
    w, h = (long, short) if rng.random() < 0.6 else (short, long)  # landscape or portrait

    # Background: a smooth random colour field (upsampled from a few pixels), then fine noise.
    coarse = rng.integers(40, 216, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
    # Clutter: distractor shapes of any kind, in muted colours, behind the object.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        r = short * rng.uniform(0.04, 0.15)
        draw.polygon(polygon(str(rng.choice(SHAPES)), rng.uniform(0, w), rng.uniform(0, h), r,
                             rng.uniform(0, 2 * math.pi)),
                     fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
    # The object: its shape and colour are the label; size, place, angle and contrast vary, and a
    # semi-transparent object on a busy background is sometimes hard to read.
    # Near the middle: the evaluation's centre crop keeps little of a 16:9 image's long side.
    r = short * rng.uniform(0.12, 0.3)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * short, h / 2 + rng.uniform(-0.15, 0.15) * short
    layer = Image.new("L", (w, h), 0)
    ImageDraw.Draw(layer).polygon(polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)),
                                  fill=int(255 * rng.uniform(0.5, 1.0)))
    fill = Image.new("RGB", (w, h), jitter(COLOURS[colour], rng, 35))
    img = Image.composite(fill, img, layer)
    # Sensor-like noise at full resolution (the reason these JPEGs are not trivially small).
    noise = rng.normal(0, rng.uniform(4, 14), (h, w, 1)).astype(np.float32)
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    kind = rng.random()
    if kind < 0.04:
        return img.convert("L"), label, ".jpg"  # grayscale JPEG: colour is lost, shape is not
    if kind < 0.08 and short <= 480:
        return img, label, ".png"  # a few small PNGs (large ones would dominate the disk)
    return img, label, ".jpg"


def write_one(job: tuple[int, int, str]) -> tuple[str, str]:
    i, seed, root = job
    img, label, suffix = make_image(i, seed)
    rel = f"{label}/{i:05d}{suffix}"
    path = Path(root) / rel
    if suffix == ".jpg":
        img.save(path, quality=90)
    else:
        img.save(path, compress_level=6)
    return rel, label


def generate(n: int, out: Path | None = None, seed: int = 0, jobs: int | None = None) -> Path:
    """The set of n images at `out` (default_dir(n)), generated unless already complete there."""
    out = Path(out) if out else default_dir(n)
    expected = {"version": VERSION, "n": n, "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return out
    # Generate into a temporary sibling and rename: an interrupted run leaves no half set in place.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for label in CLASSES:
        (tmp / label).mkdir(parents=True)
    jobs = jobs or os.cpu_count() or 1
    work = [(i, seed, str(tmp)) for i in range(n)]
    print(f"[synthetic] generating {n} images into {out} ({jobs} processes)", flush=True)
    rows = []
    with ProcessPoolExecutor(jobs) as pool:
        for k, row in enumerate(pool.map(write_one, work, chunksize=8), 1):
            rows.append(row)
            if k % 500 == 0 or k == n:
                print(f"[synthetic] {k}/{n}", flush=True)
    (tmp / "labels.csv").write_text("file,label\n" + "".join(f"{f},{lab}\n" for f, lab in rows))
    (tmp / MARKER).write_text(json.dumps(expected))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def subset_csv(root: Path, k: int) -> str:
    """A labels CSV of the first k images (csv source, `data.csv_file`), written beside labels.csv."""
    name = f"first-{k}.csv"
    lines = (root / "labels.csv").read_text().splitlines(keepends=True)
    if k > len(lines) - 1:
        raise ValueError(f"{root} holds {len(lines) - 1} images, fewer than {k}")
    (root / name).write_text("".join(lines[: k + 1]))
    return name


def disk_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe(root: Path) -> str:
    files = [p for p in root.rglob("*") if p.suffix in (".jpg", ".png")]
    jpgs = sum(p.suffix == ".jpg" for p in files)
    return (f"{len(files)} images ({jpgs} JPEG, {len(files) - jpgs} PNG) in {len(CLASSES)} classes, "
            f"{disk_size(root) / 1e6:.0f} MB on disk: {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    parser.add_argument("--out", type=Path, help="output folder (default ~/.cache/tlpipe-bench/synthetic-N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, help="generator processes (default: all CPUs)")
    args = parser.parse_args()
    if args.n < len(CLASSES):
        sys.exit(f"--n must be at least {len(CLASSES)}, one image per class")
    root = generate(args.n, args.out, args.seed, args.jobs)
    print(describe(root))


if __name__ == "__main__":
    main()
