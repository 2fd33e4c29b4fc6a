"""Progress output off a terminal: plain lines now and then, never '\r' redraws piled into one line."""

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]

LOOP = """
import time
from tlpipe import runtime
runtime.LOG_INTERVAL = 0.2
bar = runtime.progress(range(60), desc="epoch 1/1")
for i in bar:
    time.sleep(0.02)
    bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
for _ in runtime.progress(iter(range(5)), desc="no total"):
    pass
"""


def check_lines(text: str) -> list[str]:
    assert "\r" not in text
    lines = text.splitlines()
    assert all(len(line) <= 300 for line in lines), max(lines, key=len)
    return lines


def test_a_loop_off_a_terminal_prints_a_short_line_now_and_then(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LOOP], cwd=tmp_path, capture_output=True, text=True,
                          env=tool_env(TLPIPE_PROGRESS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    lines = check_lines(proc.stderr)
    epoch = [line for line in lines if line.startswith("epoch 1/1:")]
    # the start, one line per interval (about 0.2 s of a 1.2 s loop), the end: not one per step
    assert 4 <= len(epoch) <= 12, lines
    assert epoch[0].startswith("epoch 1/1:   0% 0/60")
    assert epoch[-1].startswith("epoch 1/1: 100% 60/60") and "loss=0.0167" in epoch[-1]
    assert [line for line in lines if line.startswith("no total:")][-1].startswith("no total: 5it")


def test_a_stage_run_through_pipes_logs_plain_lines(tmp_path, digit_folder):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"source": "folder", "root": str(digit_folder)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = lambda **env: subprocess.run([sys.executable, "-m", "stages.data"], cwd=tmp_path, text=True,
                                       capture_output=True, env=tool_env(PYTHONPATH=str(ROOT), **env))
    proc = run(TLPIPE_PROGRESS="1")
    assert proc.returncode == 0, proc.stderr
    lines = check_lines(proc.stdout + proc.stderr)
    assert any(line.startswith("sha256: 100% 36/36") for line in lines), lines
    assert any(line.startswith("decode check: 100% 36/36") for line in lines), lines

    hidden = run(TLPIPE_PROGRESS="0")
    assert hidden.returncode == 0, hidden.stderr
    assert not any(line.startswith(("sha256:", "decode check:")) for line in hidden.stderr.splitlines())
