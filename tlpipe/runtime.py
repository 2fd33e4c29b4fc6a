"""Resource knobs and stage plumbing.

Resource knobs come from the environment, never from params.yaml: moving a run from a laptop to a
GPU box must not invalidate DVC's caches. All of them are checked when a stage or command starts
(`check_environment`), before any work, so a bad value fails in a second with one line.

    TLPIPE_DEVICE      auto (default: cuda when available, else cpu) | cpu | cuda | cuda:N
    TLPIPE_WORKERS     data-loading worker processes, 0..64 (default: CPUs - 1, at least 1, at most
                       4, beside a process that runs a model; CPUs, at most 8, for the decode stage)
    TLPIPE_BATCH_SIZE  inference batch size, 1..65536 (default: 16 on CPU, where larger is slower;
                       128 on CUDA)
    TLPIPE_PROGRESS    0 to hide progress bars (1, the default, shows them; off a terminal they
                       are plain lines every 30 s)
    TLPIPE_ALLOW_DOWNLOAD  1 lets torchvision backbones download missing weights (default 0)
    TLPIPE_NPROC, TLPIPE_NNODES, TLPIPE_NODE_RANK, TLPIPE_MASTER_ADDR, TLPIPE_MASTER_PORT:
                       several processes (tlpipe.train.distributed)

A stage dies with the process that started it (`dvc`, or torchrun's agent): `kill -9` of dvc must
not leave an orphan that later writes outputs dvc.lock knows nothing about. See `hold_run`.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from tlpipe.paths import FINETUNED_CONFIG, RESUME


class TlpipeError(Exception):
    """An error in the user's input or setup, reported as one line without a traceback."""


def _one_line(e: BaseException) -> str:
    text = str(e)
    # An error raised in a DataLoader worker comes back wrapped: "Caught TlpipeError in DataLoader
    # worker process 0.\nOriginal Traceback ...\ntlpipe.runtime.TlpipeError: <message>".
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def _os_error_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    cause = e.strerror or str(e)
    return f"{where}: {cause}" if where else cause


def report_errors(main: Callable[[], None]) -> None:
    """Run main(); input errors become one line on stderr and exit status 2.

    An OSError that no caller turned into a TlpipeError (a disk that fills up, a folder that cannot
    be written) is still one line naming its file: these are the user's environment, not a bug.
    """
    try:
        main()
    except TlpipeError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main() through report_errors, then say how long it took."""
    start = time.perf_counter()
    hold_run()
    prune_finished_checkpoint()
    report_errors(lambda: (check_environment(), main()))
    stage = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    print(f"[{stage}] done in {time.perf_counter() - start:.2f}s", file=sys.stderr)


def prune_finished_checkpoint(config: Path = FINETUNED_CONFIG, root: Path = RESUME) -> None:
    """Remove the fine-tuning checkpoint of the run whose outputs the workspace holds (its key is in
    models/finetuned.json): restored from DVC's run-cache after an interrupted attempt, that run
    never executes again to remove it itself (see tlpipe.train.checkpoints). Every stage and command
    does this as it starts (`run_stage`), so it lives here, with no torch, rather than in the
    training wing, which the core may not import."""
    import json
    import shutil

    if not root.is_dir():
        return
    try:
        key = json.loads(config.read_text()).get("resume_key")
    except (OSError, ValueError, AttributeError):
        return
    if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{1,64}", key)):
        return
    for folder in (root / key, root / f"{key}-search"):  # the run's, and its recipe search's
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    if not any(root.iterdir()):
        root.rmdir()


# --- process lifetime -----------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"}
_owner: tuple[int, str] | None = None  # (pid, start time) of the process this run belongs to


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(command name, parent pid, start time) of a live process, from /proc; None if it is gone."""
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return comm, int(fields[1]), fields[19]


def owner_alive() -> bool:
    """Whether the process that started this stage still runs (True off Linux, where it is unknown)."""
    if _owner is None:
        return True
    stat = _stat(_owner[0])
    return stat is not None and stat[2] == _owner[1]


def check_owner(path) -> None:
    """Refuse to write `path` once the run this stage belonged to is gone."""
    if not owner_alive():
        raise TlpipeError(f"{path}: not written: the process that started this stage "
                          f"(pid {_owner[0]}) is gone, so this run no longer owns its outputs")


def hold_run() -> None:
    """Tie this stage's life to its starter's (Linux).

    The kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG). DVC starts a stage through
    $SHELL -c, and a shell that does not exec its last command (dash, /bin/sh on Debian) stays
    alive when dvc is killed; so under DVC (which sets DVC_STAGE) the owner is the shell's parent,
    watched by a thread that kills this process once the owner is gone. Outputs are committed only
    while the owner lives (`check_owner`, called by tlpipe.io before each rename into place).
    """
    global _owner
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the kernel could be told
        os.kill(os.getpid(), signal.SIGKILL)
    stat = _stat(parent)
    if stat is None:
        return
    owner, owner_stat = parent, stat
    if os.environ.get("DVC_STAGE") and stat[0] in SHELLS and stat[1] > 1:
        owner, owner_stat = stat[1], _stat(stat[1])
        if owner_stat is None:
            os.kill(os.getpid(), signal.SIGKILL)
    _owner = (owner, owner_stat[2])
    if owner != parent:
        threading.Thread(target=_watch_owner, daemon=True, name="tlpipe-owner").start()


def _watch_owner() -> None:
    while owner_alive():
        time.sleep(0.5)
    print(f"error: the process that started this stage (pid {_owner[0]}) is gone; stopping",
          file=sys.stderr)
    os.kill(os.getpid(), signal.SIGKILL)


# --- resource knobs -------------------------------------------------------------------------------

def _env_int(name: str, default: int, minimum: int, maximum: int = 1 << 16) -> int:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TlpipeError(f"environment variable {name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise TlpipeError(f"environment variable {name}={value} must be between {minimum} and {maximum}")
    return value


def _env_flag(name: str, default: str) -> str:
    raw = os.environ.get(name, "").strip() or default
    if raw not in ("0", "1"):
        raise TlpipeError(f"environment variable {name}={raw!r} must be 0 or 1")
    return raw


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _device_name() -> str:
    name = os.environ.get("TLPIPE_DEVICE", "auto").strip() or "auto"
    if not DEVICE_PATTERN.fullmatch(name):
        raise TlpipeError(f"environment variable TLPIPE_DEVICE={name!r} is not a device "
                          "(auto, cpu, cuda, cuda:N or mps)")
    return name


def check_environment() -> None:
    """Every TLPIPE_* knob, checked before any work (CUDA's presence is checked when it is used)."""
    _device_name()
    workers()
    _env_int("TLPIPE_BATCH_SIZE", 16, 1)
    progress_enabled()
    _env_flag("TLPIPE_ALLOW_DOWNLOAD", "0")
    nnodes = _env_int("TLPIPE_NNODES", 1, 1, 4096)
    _env_int("TLPIPE_NPROC", 1, 1, 1024)
    _env_int("TLPIPE_NODE_RANK", 0, 0, nnodes - 1)
    _env_int("TLPIPE_MASTER_PORT", 29500, 1, 65535)
    addr = os.environ.get("TLPIPE_MASTER_ADDR", "localhost")
    if not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]{1,253}", addr):
        raise TlpipeError(f"environment variable TLPIPE_MASTER_ADDR={addr!r} is not a host name or address")


def device():
    import torch

    name = _device_name()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TlpipeError(f"environment variable TLPIPE_DEVICE={name!r} is not a device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TlpipeError(f"TLPIPE_DEVICE={name} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TlpipeError(f"TLPIPE_DEVICE={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TlpipeError(f"TLPIPE_DEVICE={name} but MPS is not available on this machine")
    return dev


def workers(main_computes: bool = True) -> int:
    cpus = os.cpu_count() or 1
    # When the main process runs a model, one core stays with it.
    default = min(4, max(1, cpus - 1)) if main_computes else min(8, cpus)
    return _env_int("TLPIPE_WORKERS", default, 0, 64)


def training_workers(dev) -> int:
    """Loader workers for fine-tuning, which only copy decoded pixels out of the shards (the training
    process augments them on its device: tlpipe.ingest.images.TrainImages). On a CPU that copy is too
    cheap to be worth a process that takes cycles from the model (0 workers); on a GPU, workers keep
    the device fed."""
    return workers() if dev.type != "cpu" else _env_int("TLPIPE_WORKERS", 0, 0, 64)


def inference_batch_size(dev=None) -> int:
    default = 128 if dev is not None and dev.type == "cuda" else 16
    return _env_int("TLPIPE_BATCH_SIZE", default, 1)


def progress_enabled() -> bool:
    return _env_flag("TLPIPE_PROGRESS", "1") != "0"


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
