"""Unit tests for tlpipe.io: atomic file and directory replacement, hashing."""

import hashlib
import os

import pytest

from tlpipe.io import atomic_dir, atomic_path, read_json, sha256_file, write_json, write_text


class Boom(Exception):
    pass


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- atomic_path

def test_atomic_path_failure_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "out" / "model.bin"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            assert tmp != target and tmp.parent == target.parent
            tmp.write_text("new, half written")
            raise Boom()
    assert target.read_text() == "old"
    assert listing(target.parent) == ["model.bin"]


def test_atomic_path_failure_without_old_file_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "new.json"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise Boom()
    assert not target.exists()
    assert listing(target.parent) == []


def test_atomic_path_success_replaces_content(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["model.bin"]


def test_atomic_path_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert listing(target.parent) == ["c.txt"]


def test_write_json_and_text_round_trip(tmp_path):
    write_json(tmp_path / "m.json", {"b": [1, 2.5], "a": "x"})
    assert read_json(tmp_path / "m.json") == {"b": [1, 2.5], "a": "x"}
    assert (tmp_path / "m.json").read_text().endswith("\n")
    write_text(tmp_path / "m.json", "replaced")
    assert (tmp_path / "m.json").read_text() == "replaced"
    assert listing(tmp_path) == ["m.json"]


# --------------------------------------------------------------------------- atomic_dir

def make_old_dir(path):
    (path / "nested").mkdir(parents=True)
    (path / "old.txt").write_text("old")
    (path / "nested" / "keep.txt").write_text("old nested")


def test_atomic_dir_failure_keeps_old_dir_and_no_temp(tmp_path):
    target = tmp_path / "prepared"
    make_old_dir(target)
    before = tree(target)
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            assert tmp.is_dir() and listing(tmp) == [] and tmp.parent == tmp_path
            (tmp / "new.txt").write_text("new")
            raise Boom()
    assert tree(target) == before
    assert listing(tmp_path) == ["prepared"]


def test_atomic_dir_failure_without_old_dir_leaves_nothing(tmp_path):
    target = tmp_path / "data" / "prepared"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
            raise Boom()
    assert not target.exists()
    assert listing(tmp_path / "data") == []


def test_atomic_dir_success_replaces_the_whole_dir(tmp_path):
    target = tmp_path / "prepared"
    make_old_dir(target)
    with atomic_dir(target) as tmp:
        (tmp / "images").mkdir()
        (tmp / "images" / "a.png").write_text("png")
        (tmp / "manifest.csv").write_text("path\n")
        assert (target / "old.txt").exists()  # the old dir stays in place until the end
    assert tree(target) == {"images/a.png": "png", "manifest.csv": "path\n"}
    assert listing(tmp_path) == ["prepared"]  # no temp dir, no .old dir


def test_atomic_dir_success_twice(tmp_path):
    target = tmp_path / "out"
    for content in ("first", "second"):
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text(content)
        assert tree(target) == {"f.txt": content}
        assert listing(tmp_path) == ["out"]


# --------------------------------------------------------------------------- sha256_file

def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=97) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------- leftovers of killed writers

def dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


@pytest.mark.parametrize("use_dir", [False, True])
def test_next_writer_removes_temps_of_a_killed_writer_only(tmp_path, use_dir):
    name = "features" if use_dir else "model.bin"
    dead, live = dead_pid(), os.getppid()  # our parent (pytest's runner) is alive
    stale_dir = tmp_path / f".{name}.{dead}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "train.safetensors").write_text("half")
    stale_file = tmp_path / f".{name}.{dead}.old.tmp"
    stale_file.write_text("old")
    live_tmp = tmp_path / f".{name}.{live}.xyz.tmp"
    live_tmp.write_text("being written")
    other = tmp_path / f".other.{dead}.q.tmp"  # another output's temp: not ours to judge
    other.write_text("x")

    context = atomic_dir if use_dir else atomic_path
    with context(tmp_path / name) as tmp:
        assert f".{name}.{os.getpid()}." in tmp.name  # our own temp carries our pid
        if use_dir:
            (tmp / "f").write_text("new")
        else:
            tmp.write_text("new")
    assert listing(tmp_path) == sorted([name, live_tmp.name, other.name])
