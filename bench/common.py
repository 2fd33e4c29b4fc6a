"""Shared plumbing of the benchmark scripts: projects, monitored stage runs, tables, the machine.

tlpipe's side of every comparison is its real code path: a project made by `tlpipe.tools.scaffold` (the
pipeline a user gets), whose stages run as subprocesses (`python -m stages.X`) exactly as `dvc
repro` runs them. Each run is timed three ways, and the tables say which one they use:

- wall: the subprocess from start to exit (Python start-up and imports included);
- stage: the `[stage] done in Xs` line the stage prints (its main(): params, model build, reading,
  computing and writing outputs; not the interpreter start-up or the imports);
- in-process hot loops, where the reference is an in-process loop (named as such in the tables).

Peak memory is the summed RSS of the stage's whole process tree (DataLoader workers included),
polled every 20 ms with psutil. Shared pages (torch's libraries in forked workers) count once per
process, so the sum overstates the truth a little; it is the same measure for every run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # after bench/ (the scripts), before an installed tlpipe
from tlpipe.report.compare import flatten  # noqa: E402 (needs the path above)
from tlpipe.tools.scaffold import PHOTO_GEOMETRY, create_project  # noqa: E402

HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
# The photo geometry of docs/photos.md, used on both image sets (the defaults suit 8x8 digit scans).
BACKBONE = "tf_efficientnet_lite0"


def say(message: str) -> None:
    """A progress line: long runs show where they are."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- results and Markdown


@dataclass
class Target:
    """One DESIGN.md §8 target: what it asks, what was measured, whether it is met (None: not judged)."""
    name: str
    target: str
    measured: str
    ok: bool | None
    note: str = ""


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # Markdown paragraphs and tables, in order
    targets: list[Target] = field(default_factory=list)

    def markdown(self) -> str:
        return f"## {self.title}\n\n" + "\n\n".join(self.parts) + "\n"


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    return table(["target", "required", "measured", "result", "note"],
                 [[t.name, t.target, t.measured, verdict(t.ok), t.note] for t in targets])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


# ---------------------------------------------------------------- the machine


def machine() -> dict[str, str]:
    import PIL
    import torch
    import torchvision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    # check=False: outside a git checkout these print nothing, and the report says so.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True, check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, text=True,
                           capture_output=True, check=False).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical); "
                 f"torch threads {torch.get_num_threads()}",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "GPU": "none used (CPU only)",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}",
        "tlpipe commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


# ---------------------------------------------------------------- projects and stage runs


@dataclass
class StageRun:
    stage: str
    wall: float         # seconds, subprocess start to exit
    seconds: float      # the stage's own "[stage] done in Xs"
    peak_rss: int       # bytes, summed over the process tree
    stdout: str
    stderr: str


def tool_env() -> dict[str, str]:
    # The project's commands run with this venv's python and dvc; progress bars off (captured output).
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TLPIPE_PROGRESS": "0", "DVC_NO_ANALYTICS": "1"}


def _tree_rss(proc: psutil.Process) -> int:
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_monitored(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, int, str, str, int]:
    """Run cmd; (wall seconds, peak summed RSS of its process tree, stdout, stderr, return code)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or tool_env(), stdout=out, stderr=err, text=True)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watched))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return wall, peak, out.read(), err.read(), proc.returncode


class Project:
    """A scaffolded tlpipe project whose stages the benchmarks run, each at most once."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = Path(path), label
        self.runs: dict[str, StageRun] = {}
        self.variants: dict[str, Project] = {}

    @classmethod
    def create(cls, path: Path, label: str, overrides: dict) -> Project:
        say(f"{label}: new project {path}")
        shutil.rmtree(path, ignore_errors=True)  # every benchmark starts cold
        return cls(create_project(path, overrides), label)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def has_stage(self, stage: str) -> bool:
        return (self.path / "stages" / f"{stage}.py").is_file()

    def run(self, stage: str) -> StageRun:
        """Run `python -m stages.<stage>` here (once; later calls return the first run)."""
        if stage not in self.runs:
            say(f"{self.label}: stage {stage} ...")
            wall, peak, out, err, code = run_monitored([sys.executable, "-m", f"stages.{stage}"], self.path)
            if code:
                sys.exit(f"stage {stage} failed in {self.path} (exit {code}):\n{out[-3000:]}\n{err[-3000:]}")
            found = re.findall(rf"\[{stage}\] done in ([\d.]+)s", err)
            self.runs[stage] = StageRun(stage, wall, float(found[-1]) if found else wall, peak, out, err)
            r = self.runs[stage]
            say(f"{self.label}: stage {stage} done: {r.seconds:.1f}s (wall {r.wall:.1f}s, "
                f"peak RSS {mib(r.peak_rss)})")
        return self.runs[stage]

    def prepare(self, up_to: str) -> None:
        """Run the pipeline's input stages in order, up to and including `up_to`."""
        order = [s for s in ("data", "decode", "stats", "features") if self.has_stage(s)]
        for stage in order[: order.index(up_to) + 1]:
            self.run(stage)

    def variant(self, name: str, overrides: dict) -> Project:
        """A sibling project with some params changed that shares this one's prepared images
        (a symlink to data/prepared, so the data stage's copy is not repeated)."""
        if name not in self.variants:
            self.run("data")
            params = {**flatten(self.params()), **overrides}
            v = Project.create(self.path.parent / f"{self.path.name}-{name}", f"{self.label} ({name})", params)
            (v.path / "data" / "prepared").symlink_to((self.path / "data" / "prepared").resolve())
            v.runs["data"] = self.runs["data"]
            self.variants[name] = v
        return self.variants[name]

    def decoding(self) -> bool:
        """Whether this pipeline has the decode stage (stats/features read its shards)."""
        return self.has_stage("decode")

    def jpeg_draft(self) -> bool | None:
        return self.params()["image"].get("jpeg_draft")


@contextmanager
def inside(project: Project):
    """Run tlpipe's in-process code from the project dir (its paths are relative to it)."""
    before = os.getcwd()
    os.chdir(project.path)
    try:
        yield
    finally:
        os.chdir(before)


def image_folder_tree(project: Project, dest: Path, splits: tuple[str, ...]) -> Path:
    """`dest/<class>/<row>.<ext>`: symlinks to the project's prepared images of the given splits,
    the class-folder layout `torchvision.datasets.ImageFolder` reads. Named by manifest row (zero
    padded, so ImageFolder's sorted order is manifest order within a class) to map results back.
    Links, not copies: the images are read where they are."""
    import pandas as pd
    from torchvision.datasets.folder import IMG_EXTENSIONS

    manifest = pd.read_csv(project.path / "data" / "prepared" / "manifest.csv", dtype=str, keep_default_na=False)
    shutil.rmtree(dest, ignore_errors=True)
    from tlpipe.manifest import image_root

    images = project.path / image_root(project.path / "data" / "prepared")  # data.root: no copy is made
    for row, (rel, label, split) in enumerate(zip(manifest["path"], manifest["label"], manifest["split"])):
        if split in splits:
            suffix = Path(rel).suffix.lower()
            if suffix not in IMG_EXTENSIONS:
                # ImageFolder lists only some suffixes (not .gif: hymenoptera has one); PIL reads
                # by content, so an extra ".png" makes it list the file without changing its pixels.
                suffix += ".png"
            link = dest / label / f"{row:06d}{suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((images / rel).resolve())
    return dest


def row_of(path: str | Path) -> int:
    """The manifest row of an image_folder_tree link."""
    return int(Path(path).name.split(".")[0])


# ---------------------------------------------------------------- devices


def synchronize(dev) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work (CUDA runs
    asynchronously; the CPU needs nothing)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def watch_first_conv(model) -> dict:
    """What a loop really runs, seen at the model's first Conv2d on its first call: the device, whether
    its input is channels_last, and the conv's output dtype (bfloat16 under bf16 autocast). A dict,
    filled by a forward hook when the model runs; empty for a model without a Conv2d."""
    import torch

    seen: dict = {}
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)

    def hook(module, inputs, output) -> None:
        if not seen:
            x = inputs[0]
            seen.update(device=str(x.device), channels_last=x.is_contiguous(memory_format=torch.channels_last),
                        dtype=str(output.dtype).removeprefix("torch."))
    if conv is not None:
        conv.register_forward_hook(hook)
    return seen


class WatchedLoader:
    """A DataLoader that notes whether its image batches arrive in pinned (page-locked) memory, the
    memory a non-blocking copy to a GPU needs."""

    def __init__(self, loader):
        self.loader, self.dataset, self.pinned = loader, loader.dataset, set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:  # (images, ...)
            self.pinned.add(batch[0].is_pinned())
            yield batch


# ---------------------------------------------------------------- the image sets


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sets", default="hymenoptera,synthetic",
                        help="comma-separated image sets: hymenoptera, synthetic (default both)")
    parser.add_argument("--n", type=int, default=5000, help="synthetic images (default 5000)")
    parser.add_argument("--quick", action="store_true", help="small synthetic set (300), for development")
    parser.add_argument("--hymenoptera", type=Path, default=HYMENOPTERA, help="the ants/bees folder")
    parser.add_argument("--workdir", type=Path, help="where projects are built (default: a temporary "
                        "folder, deleted at the end); kept when given")


def synthetic_n(args) -> int:
    return 300 if args.quick else args.n


def make_projects(args, workdir: Path) -> list[Project]:
    """One project per requested image set, with the photo geometry."""
    import synthetic

    projects = []
    for name in args.sets.split(","):
        if name == "hymenoptera":
            if not args.hymenoptera.is_dir():
                sys.exit(f"hymenoptera not found: {args.hymenoptera}")
            projects.append(Project.create(workdir / "hymenoptera", "hymenoptera", {
                "data.source": "presplit", "data.root": str(args.hymenoptera.resolve()), **PHOTO_GEOMETRY}))
        elif name == "synthetic":
            n = synthetic_n(args)
            root = synthetic.generate(n)
            say(synthetic.describe(root))
            projects.append(Project.create(workdir / f"synthetic-{n}", f"synthetic-{n}", {
                "data.source": "folder", "data.root": str(root), **PHOTO_GEOMETRY}))
        else:
            sys.exit(f"unknown image set {name!r} (hymenoptera, synthetic)")
    return projects


class Workdir:
    """The given folder (kept), or a temporary one removed at the end."""

    def __init__(self, given: Path | None):
        self.given = given

    def __enter__(self) -> Path:
        if self.given:
            self.given.mkdir(parents=True, exist_ok=True)
            self.path = self.given.resolve()
        else:
            self.path = Path(tempfile.mkdtemp(prefix="tlpipe-bench-"))
        return self.path

    def __exit__(self, *exc) -> None:
        if not self.given:
            shutil.rmtree(self.path, ignore_errors=True)


def standalone(run_one, description: str, extra_args=None) -> None:
    """main() of a per-topic script: build the projects, run the benchmark on each, print Markdown."""
    parser = argparse.ArgumentParser(description=description)
    add_dataset_args(parser)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    with Workdir(args.workdir) as workdir:
        sections = [run_one(p, workdir, args) for p in make_projects(args, workdir)]
    for s in sections:
        print()
        print(s.markdown())
        print(targets_table(s.targets))


if __name__ == "__main__":
    # A library of the benchmark scripts; --help says so, and running it shows this machine's entry.
    argparse.ArgumentParser(description=__doc__.splitlines()[0],
                            epilog="Used by every bench/ script; `python bench/all.py` runs them all.").parse_args()
    print(table(["", ""], [[k, v] for k, v in machine().items()]))
