"""kill -9 of a real `dvc repro` while the features stage runs, then `dvc repro` again.

What must hold: a later stage never finds a partial output (data/features is absent, or complete
and identical to a clean run's), and rerunning needs no manual step: DVC notices the killed
process in its lock file (`.dvc/tmp/rwlock`) and drops it; the next write of data/features
removes the temporary folder the killed stage left.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import dvc, read_json, tiny_params, tool_env
from tlpipe.io import sha256_file
from tlpipe.nets.features import load_split
from tlpipe.tools.scaffold import create_project

pytestmark = pytest.mark.slow  # three runs of the features stage through dvc


class Run:
    """`dvc repro ...` in its own process group, stdout collected by a thread."""

    def __init__(self, project: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=project,
                                     env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.started_at = self.done_at = None  # the stage's command launched / its main() ended
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("> python -m stages.features"):  # dvc launches the stage's command
                self.started_at = time.monotonic()
            if line.startswith("[features] done"):  # run_stage's last line
                self.done_at = time.monotonic()

    def wait_for_stage(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while self.started_at is None:
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "features stage never started:\n" + "".join(self.lines)
            time.sleep(0.02)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # dvc and the stage's python alike
        self.proc.wait()

    def finish(self, timeout=300.0):
        self.proc.wait(timeout)
        time.sleep(0.1)  # let the reader thread take the last lines
        return "".join(self.lines)


def feature_files(project: Path) -> dict[str, str]:
    folder = project / "data" / "features"
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())} if folder.exists() else {}


def temps(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "data").iterdir() if p.name.startswith(".features."))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digit_folder):
    """A project run up to the features stage, with the clean run's files and the stage's duration."""
    project = create_project(tmp_path_factory.mktemp("fault") / "project", tiny_params(digit_folder))
    run = Run(project, "features")
    out = run.finish()
    assert run.proc.returncode == 0, out
    duration = run.done_at - run.started_at  # the stage's process: imports, backbone, extraction
    files = feature_files(project)
    assert sorted(files) == ["layers-test.safetensors", "layers-train.safetensors", "layers-val.safetensors",
                             "meta.json", "test.safetensors", "train.safetensors", "val.safetensors"]
    return SimpleNamespace(project=project, files=files, duration=duration)


def assert_nothing_partial(project: Path, clean_files: dict[str, str]) -> None:
    """Where the head stage reads: nothing, or the complete files of a clean run."""
    files = feature_files(project)
    if files:
        assert files == clean_files
        for split in ("train", "val", "test"):
            load_split(split, project / "data" / "features")


def assert_no_live_lock(project: Path) -> None:
    """Entries of the killed dvc may stay in the rwlock file; dvc skips (and drops) dead pids."""
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists():
        lock = read_json(rwlock)
        holders = [h for hs in lock.get("read", {}).values() for h in hs] + list(lock.get("write", {}).values())
        for holder in holders:
            with pytest.raises(ProcessLookupError):
                os.kill(holder["pid"], 0)


def test_kill_during_extraction_then_repro_completes_identically(clean):
    project = clean.project
    run = Run(project, "--force", "--single-item", "features")
    run.wait_for_stage()
    time.sleep(0.5 * clean.duration)  # well inside the stage: imports, backbone, forward passes
    assert run.done_at is None, "the stage ended before the kill"
    run.kill()
    assert run.proc.returncode == -signal.SIGKILL
    assert_nothing_partial(project, clean.files)
    assert not feature_files(project)  # dvc removed the outputs before the stage ran
    assert_no_live_lock(project)

    # What a user does next: plain `dvc repro`. No lock file to delete by hand.
    again = dvc(project, "repro", "features")
    assert "features" in again.stdout
    assert feature_files(project) == clean.files
    assert_no_live_lock(project)


def test_kill_while_writing_then_recompute_is_byte_identical_and_cleans_up(clean):
    project = clean.project
    run = Run(project, "--force", "--single-item", "features")
    run.wait_for_stage()
    time.sleep(0.5 * clean.duration)
    # Catch the moment the stage writes: its temporary folder beside data/features appears.
    seen = []
    while run.proc.poll() is None and not seen:
        seen = temps(project)
    if run.proc.poll() is None:
        run.kill()
    else:
        run.finish()
    # Whether or not the kill hit the write, nothing partial is where a later stage reads.
    assert_nothing_partial(project, clean.files)
    if seen and run.proc.returncode == -signal.SIGKILL:
        print(f"killed while writing; left behind: {temps(project)}")

    # A real recomputation (not the run-cache): byte-identical to the clean run, leftovers removed.
    again = dvc(project, "repro", "--force", "--single-item", "features")
    assert again.executed == ["features"]
    assert feature_files(project) == clean.files
    assert temps(project) == []
    assert_no_live_lock(project)
