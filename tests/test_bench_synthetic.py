"""bench/synthetic.py: the benchmark image set is complete, labelled, the same on every run, reused."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "synthetic.py"

pytestmark = pytest.mark.slow  # generates ~35 MB of large JPEGs twice


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.suffix in (".jpg", ".png")}


def generate(out: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--n", "40", "--out", str(out)], check=True,
                   capture_output=True)


def test_forty_images_in_ten_classes_identical_across_runs_and_reused(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    first = digests(tmp_path / "a")
    assert len(first) == 40
    assert len({name.split("/")[0] for name in first}) == 10
    assert first == digests(tmp_path / "b")
    labels = (tmp_path / "a" / "labels.csv").read_text().splitlines()
    assert labels[0] == "file,label" and len(labels) == 41

    image = next((tmp_path / "a").glob("*/*.jpg"))
    before = image.stat().st_mtime_ns
    generate(tmp_path / "a")  # complete (marker matches): kept as is
    assert image.stat().st_mtime_ns == before
