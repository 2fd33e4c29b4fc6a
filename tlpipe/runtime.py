"""Resource knobs and stage plumbing.

Resource knobs come from the environment, never from params.yaml: moving a run from a laptop to a
GPU box must not invalidate DVC's caches.

    TLPIPE_DEVICE      auto (default: cuda when available, else cpu) | cpu | cuda | cuda:N
    TLPIPE_WORKERS     data-loading worker processes (default: CPUs - 1, at least 1, at most 4,
                       beside a process that runs a model; CPUs, at most 8, for the decode stage)
    TLPIPE_BATCH_SIZE  inference batch size (default: 16 on CPU, where larger is slower; 128 on CUDA)
    TLPIPE_PROGRESS    0 to hide progress bars (off a terminal they are plain lines every 30 s)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable


class TlpipeError(Exception):
    """An error in the user's input or setup, reported as one line without a traceback."""


def report_errors(main: Callable[[], None]) -> None:
    """Run main(); input errors become one line on stderr and exit status 2."""
    try:
        main()
    except TlpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main() through report_errors, then say how long it took."""
    start = time.perf_counter()
    report_errors(main)
    stage = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    print(f"[{stage}] done in {time.perf_counter() - start:.2f}s", file=sys.stderr)


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TlpipeError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise TlpipeError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def device():
    import torch

    name = os.environ.get("TLPIPE_DEVICE", "auto").strip() or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TlpipeError(f"environment variable TLPIPE_DEVICE={name!r} is not a device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TlpipeError(f"TLPIPE_DEVICE={name} but CUDA is not available on this machine")
    return dev


def workers(main_computes: bool = True) -> int:
    cpus = os.cpu_count() or 1
    # When the main process runs a model, one core stays with it.
    default = min(4, max(1, cpus - 1)) if main_computes else min(8, cpus)
    return _env_int("TLPIPE_WORKERS", default, 0)


def inference_batch_size(dev=None) -> int:
    default = 128 if dev is not None and dev.type == "cuda" else 16
    return _env_int("TLPIPE_BATCH_SIZE", default, 1)


def progress_enabled() -> bool:
    return os.environ.get("TLPIPE_PROGRESS", "1") != "0"


# Off a terminal (a log file, CI, a DVC queue worker), a progress line at most this often.
LOG_INTERVAL = 30.0


class _Lines:
    """tqdm's output stream off a terminal: a plain line at most every LOG_INTERVAL seconds.

    tqdm redraws its bar with '\r', which a log file keeps, piling every update into one line of
    thousands of characters. Here each redraw replaces a pending line, written when the interval has
    passed; the first one and the last (tqdm ends a bar with a bare newline) are always written.
    """

    def __init__(self, stream):
        self.stream, self.pending, self.last = stream, None, None

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        now = time.monotonic()
        if text:
            self.pending = text
            if self.last is not None and now - self.last < LOG_INTERVAL:
                return
        if self.pending:
            self.stream.write(self.pending + "\n")
            self.pending, self.last = None, now

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
             enabled: bool = True, **kwargs: Any):
    """A tqdm progress bar on a terminal; elsewhere a line such as `decode train:  35% 40/113 [00:30<00:55,
    1.32it/s]` at the start, every LOG_INTERVAL seconds and at the end. Hidden by TLPIPE_PROGRESS=0,
    or by `enabled` False (e.g. on every rank but the first)."""
    from tqdm import tqdm

    disable = not (enabled and progress_enabled())
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)
    return tqdm(iterable, desc=desc, total=total, file=_Lines(sys.stderr), ncols=0,
                **kwargs)
