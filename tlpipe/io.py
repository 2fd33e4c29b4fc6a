"""Atomic file output and content hashing.

Every artifact is written to a temporary name in its final directory and renamed into place, so a
killed stage never leaves a partial file where a later stage could read it. Temporary names carry
the writer's pid (`.<name>.<pid>.<random>.tmp`), so the next writer of the same path removes what a
killed one left behind (a half-copied data/prepared can be large) without touching a live one's.

A write that fails (a full disk, a read-only folder) is one line naming the output and the cause
(`TlpipeError`), the temporary removed; nothing is renamed into place once the process that started
the stage is gone (tlpipe.runtime.check_owner). Producers record the sha256 of each file they write
(`file_hashes`) and consumers check it (`verify_sha256`, `load_tensors`) before use: DVC trusts
mtimes, so a file altered in place with its mtime kept would otherwise be used as it is.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import math
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tlpipe.runtime import TlpipeError, check_owner

# errno values that mean "this output cannot be written", whatever file the OSError names
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` left by writers that no longer run (killed, e.g. by kill -9)."""
    prefix = f".{path.name}."
    for entry in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = entry.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with writing(path, tmp):
            yield tmp
        check_owner(path)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(option: str, value: str | Path) -> None:
    """Fail before any work, in one line naming `option`, when the file `value` could not be written
    later: a temporary is created (and removed) beside it, as atomic_path will create one, because
    os.access answers "writable" to root whatever the folder (a read-only mount, /sys, ...)."""
    path = Path(value)
    folder = path.parent if str(path.parent) else Path(".")
    if not str(value) or path.is_dir():
        raise TlpipeError(f"{option} {str(value)!r}: not a file name")
    if not folder.exists():
        raise TlpipeError(f"{option} {value}: folder {folder} does not exist")
    if not folder.is_dir():
        raise TlpipeError(f"{option} {value}: {folder} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise TlpipeError(f"{option} {value}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)
    if path.exists() and not os.access(path, os.W_OK):
        raise TlpipeError(f"{option} {value}: not writable")


def _is_write_error(e: BaseException) -> bool:
    # safetensors reports its OS errors as SafetensorError("Error while serializing: IoError(...)")
    return type(e).__name__ == "SafetensorError" and "serializ" in str(e).lower()


@contextmanager
def writing(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Errors of writing `path` (through `tmp`, a temporary beside or inside it) become one line
    naming `path` and the cause. OSErrors about other files (inputs being read) pass through."""
    path = Path(path)
    try:
        yield
    except TlpipeError as e:  # raised inside, about a file in the temporary: name its final place
        if tmp is None or str(tmp) not in str(e):
            raise
        raise TlpipeError(str(e).replace(str(tmp), str(path))) from None
    except OSError as e:
        names = [Path(n) for n in (e.filename, e.filename2) if isinstance(n, (str, Path))]
        inside = [n for n in names if tmp is not None and (n == Path(tmp) or Path(tmp) in n.parents)]
        if not inside and e.errno not in WRITE_ERRNOS and not (tmp is None and Path(path) in names):
            raise
        target = path / inside[0].relative_to(tmp) if inside and inside[0] != Path(tmp) else path
        raise TlpipeError(f"{target}: cannot write ({e.strerror or e})") from None
    except Exception as e:
        if not _is_write_error(e):
            raise
        # e.g. 'Error while serializing: I/O error: No space left on device (os error 28)', or in
        # older releases '... IoError(Os { code: 28, ..., message: "No space left on device" })'
        cause = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error \d+\)', str(e))
        text = next(g for g in cause.groups() if g) if cause else str(e).splitlines()[0]
        raise TlpipeError(f"{path}: cannot write ({text})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file; a damaged one is one line naming it (a missing one raises FileNotFoundError)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TlpipeError(f"{path}: not valid JSON ({e}); rerun the stage that wrote it") from None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` as a whole when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        with writing(path, tmp):
            yield tmp
        check_owner(path)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: str | Path, names) -> dict[str, str]:
    """{name: sha256} of files in `folder`: what a producer records beside its outputs."""
    return {name: sha256_file(Path(folder) / name) for name in sorted(names)}


def verify_sha256(path: str | Path, expected: str | None, record: str | Path, rerun: str) -> None:
    """`path` must have the sha256 its producer recorded in `record` (a file or a description)."""
    if not isinstance(expected, str):
        raise TlpipeError(f"{record}: no sha256 recorded for {path}; rerun the {rerun} stage")
    try:
        got = sha256_file(path)
    except FileNotFoundError:
        raise TlpipeError(f"{path}: missing; run the {rerun} stage first (dvc repro {rerun})") from None
    check_digest(path, got, expected, record, rerun)


def check_digest(path: str | Path, got: str, expected: str, record: str | Path, rerun: str) -> None:
    """The one message for bytes that are not those their producer recorded."""
    if got != expected:
        raise TlpipeError(f"{path}: sha256 {got[:12]} is not the {expected[:12]} recorded in {record}: "
                          f"the file was altered after it was written; rerun the {rerun} stage "
                          f"(dvc repro --force {rerun})")


def load_tensors(path: str | Path, rerun: str, expected_sha256: str | None = None,
                 record: str | Path | None = None) -> dict:
    """A safetensors file's tensors, refused with one line when unreadable, altered since its
    producer recorded its sha256 (when `record` is given) or holding a non-finite float."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if record is not None:
        verify_sha256(path, expected_sha256, record, rerun)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise TlpipeError(f"{path}: missing; run the {rerun} stage first (dvc repro {rerun})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise TlpipeError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]}); "
                          f"rerun the {rerun} stage") from None
    check_finite(path, tensors)
    return tensors


def check_finite(path: str | Path, tensors: dict) -> None:
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TlpipeError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf); refusing "
                              "to use it")


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
