"""bench/gpu.py: one command for features and fine-tuning images/s against the compute limit, on
CUDA when there is one; here it runs on the CPU and must say so."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tool_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def cells(text: str, first: str) -> list[str]:
    """The cells of the one Markdown table row whose first cell is `first`."""
    lines = [line for line in text.splitlines() if line.startswith(f"| {first} |")]
    assert len(lines) == 1, f"one row {first!r} expected in:\n{text}"
    return [cell.strip() for cell in lines[0].strip("|").split(" | ")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda would measure it")
def test_cuda_without_a_gpu_is_one_clear_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], env=tool_env(), text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA GPU found (torch.cuda.is_available() is False); --device cpu measures the CPU"]


@pytest.mark.slow  # a project through data..features, then the loops and limits (~1 min of CPU)
def test_cpu_run_prints_both_stages_against_their_limits(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--images", "digits", "--n", "60", "--img-size", "32",
         "--resize-size", "36", "--epochs", "1", "--repeats", "2", "--limit-images", "32",
         "--workdir", str(tmp_path / "work")],
        env=tool_env(TLPIPE_WORKERS="1"), text=True, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| GPU | none found: the numbers are CPU numbers |" in out
    assert "No GPU was used: these are CPU numbers (fp32), not GPU numbers." in out

    # 60 of the 1797 digit scans: 6 or 7 per class (subset_folder rounds up), 66 images, 46 of them train.
    features, finetuning = cells(out, "features"), cells(out, "fine-tuning")
    assert "all 66 images" in features[1] and "46 train images" in finetuning[1]
    for row, batch in ((features, "16"), (finetuning, "32")):
        assert row[3:6] == ["cpu", "fp32", batch]
        ours, limit, ratio = float(row[6]), float(row[7]), float(row[8])
        assert ours > 0 and limit > 0 and ratio > 0
        assert ratio == pytest.approx(ours / limit, rel=0.02, abs=0.01)

    # What ran, seen at the first convolution: on the CPU, fp32 channels_last, no pinned batches.
    for name in ("features: tlpipe loop", "features: limit", "fine-tuning: tlpipe loop", "fine-tuning: limit"):
        assert cells(out, name)[1:4] == ["cpu", "channels_last", "float32"], name
    assert cells(out, "fine-tuning: tlpipe loop")[4] == "no"
    assert re.search(r"## gpu: digits \(32 px, tf_efficientnet_lite0\) on CPU", out)
