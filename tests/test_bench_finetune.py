"""bench/finetune.py --quick: the three loops run on real images and the table judges the targets."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tool_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "finetune.py"

sys.path.append(str(SCRIPT.parent))  # last: bench/'s module names shadow nothing
import finetune  # noqa: E402 (bench/finetune.py, from the path above)

MIB = 1 << 20


def test_peak_rss_is_flat_within_64_mib_or_10_percent_and_judged_from_one_batch():
    flat = finetune.memory_target(34, 5000 * MIB, 171, 5100 * MIB)
    assert flat.ok is True and flat.target == "growth <= 500 MiB"
    assert finetune.memory_target(34, 5000 * MIB, 171, 5600 * MIB).ok is False
    assert finetune.memory_target(34, 300 * MIB, 171, 360 * MIB).ok is True  # the 64 MiB floor
    assert finetune.memory_target(34, 300 * MIB, 171, 370 * MIB).ok is False
    assert finetune.memory_target(9, 2500 * MIB, 42, 5000 * MIB).ok is None  # below a batch of 32


def row(text: str, start: str) -> list[str]:
    """The cells of the Markdown table row whose first cell starts with `start`."""
    lines = [line for line in text.splitlines() if line.startswith(f"| {start}")]
    assert len(lines) == 1, f"one row starting {start!r} expected in:\n{text}"
    return [cell.strip() for cell in lines[0].strip("|").split(" | ")]


@pytest.mark.slow  # two projects through data..features, then four training processes
def test_quick_run_measures_three_loops_and_judges_the_targets(tmp_path, digit_folder):
    # The timeout guards against hangs: the run takes ~85 s of CPU, far more wall on a busy CPU.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data", str(digit_folder), "--img-size", "32",
         "--resize-size", "36", "--workdir", str(tmp_path / "work")],
        env=tool_env(TLPIPE_WORKERS="1"), text=True, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| CPU |" in out  # the machine it ran on

    # 36 scans, 12 per class: 8 per class train (2 val, 2 test); the fifth: 3 per class, 1 train.
    ours = row(out, "tlpipe: the finetune stage's training loop, in-process")
    fifth = row(out, "tlpipe: the same, on a fifth")
    plain = row(out, "plain: ImageFolder + RandomResizedCrop")
    limit = row(out, "compute limit: forward + backward + AdamW step")
    assert ours[1] == "24" and fifth[1] == "3" and plain[1] == "24" and limit[1] == "24"
    assert ours[2] == "1 epochs" and limit[2] == "best of 2 passes"
    rates = {name: float(r[3]) for name, r in (("ours", ours), ("plain", plain), ("limit", limit))}
    assert all(v > 0 for v in rates.values())
    assert all(r[5].endswith(" MiB") and int(r[5].split()[0]) > 100 for r in (ours, fifth, plain, limit))

    # Each target's verdict follows from its measured ratio (printed to 2 decimals).
    for name, required, numerator, denominator in (("vs plain loop", 1.5, "ours", "plain"),
                                                   ("vs compute limit", 0.8, "ours", "limit")):
        cells = row(out, f"finetune {name}")
        ratio = float(re.match(r"([\d.]+)x", cells[2]).group(1))
        assert ratio == pytest.approx(rates[numerator] / rates[denominator], rel=0.01, abs=0.01)
        if abs(ratio - required) > 0.01:  # away from the threshold, where rounding cannot decide
            assert cells[3] == ("PASS" if ratio > required else "FAIL")
    memory = row(out, "finetune peak RSS (3 vs 24 train images)")
    assert len(re.findall(r"(\d+) MiB", memory[2])) == 2
    # 3 train images are less than a batch of 32: smaller batches, a smaller peak, so not judged.
    assert memory[3] == "n/a" and "below one batch" in memory[4]
