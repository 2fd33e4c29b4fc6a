"""Integrity end to end (issue 30): every consumer verifies what it reads, and the last hostile inputs.

Serious (a silent wrong result before): a source image altered in place after the data stage is
refused by the stage that decodes it (its bytes against the manifest's sha256); a damaged but
loadable ONNX file is refused by `tlpipe predict` (the seal the export writes into it). Minor: an
empty or non-mapping params.yaml, an --out folder that refuses new files (as root too), and
messages that named the wrong thing. Each case asserts the exact one-line error (or warning) and
that nothing half-written is left; the serious ones also run through real `dvc repro` and
`tlpipe predict`. docs/bad-data.md lists the same cases.
"""

import hashlib
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import copy_project, dvc
from test_hostile import (assert_error, assert_ok, class_folder, cli, dataset_members, exif_jpeg, flip,
                          make_zip, new_project, stage, tampered, temporaries, write_png)
from tlpipe import io as tio
from tlpipe.deploy.onnx_model import SEAL_KEY
from tlpipe.ingest.pixels import check_image
from tlpipe.report import gallery
from tlpipe.runtime import TlpipeError

SEAL_MESSAGE = ("{path}: sha256 {got} is not the {sealed} sealed in it at export: the file was altered after it "
                "was written; export it again (dvc repro --force export_head or export_finetuned)")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def overwrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """`data` (zero-padded to the file's size) written over `path`, its mtime kept: what DVC cannot see."""
    info = path.stat()
    assert len(data) <= info.st_size
    path.write_bytes(data + bytes(info.st_size - len(data)))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def private_source(tmp_path: Path, digit_folder: Path) -> Path:
    """A copy of the session's digit folder to alter: the data stage keeps no copy of the images, so
    a source image altered in place is the file at data.root itself."""
    return Path(shutil.copytree(digit_folder, tmp_path / "source"))


def other_class_image(project: Path, images: Path) -> tuple[str, bytes]:
    """A train image of the first class, and the bytes of a smaller image of another class."""
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str)
    target = manifest[(manifest["split"] == "train") & (manifest["label"] == manifest["label"].iloc[0])]
    target = max(target["path"], key=lambda p: (images / p).stat().st_size)
    donors = manifest[manifest["label"] != manifest["label"].iloc[0]]["path"]
    donor = min(donors, key=lambda p: (images / p).stat().st_size)
    assert (images / donor).stat().st_size < (images / target).stat().st_size
    return target, (images / donor).read_bytes()


# --- serious 1: a source image altered in place -------------------------------------------------------

@pytest.mark.slow  # stage processes: data, decode, then decode again on the altered image
@pytest.mark.parametrize("damage", ["another class's pixels", "zeroed after the first half"])
def test_an_image_altered_in_place_is_refused_by_the_decode_stage(tmp_path, digit_folder, damage):
    source = private_source(tmp_path, digit_folder)
    project = new_project(tmp_path, source)
    for name in ("data", "decode"):
        assert_ok(stage(project, name))
    before = tree(project / "data/decoded")
    rel, donor = other_class_image(project, source)
    path = source / rel
    old = tio.sha256_file(path)
    if damage == "another class's pixels":
        overwrite_keeping_size_and_mtime(path, donor)
    else:
        raw = path.read_bytes()
        overwrite_keeping_size_and_mtime(path, raw[: len(raw) // 2])
    for workers in ("0", "2"):  # in the main process, and raised in a DataLoader worker
        proc = stage(project, "decode", TLPIPE_WORKERS=workers)
        assert_error(proc, tampered(project, path, "data/prepared/manifest.csv", "data", old))
    assert tree(project / "data/decoded") == before and not temporaries(project / "data")


def test_the_galleries_check_the_images_they_draw(tmp_path):
    images = tmp_path / "images"
    write_png(images / "a/1.png", seed=1)
    write_png(images / "b/2.png", seed=2)
    hashes = {p: tio.sha256_file(images / p) for p in ("a/1.png", "b/2.png")}
    gallery.draw(["a/1.png", "b/2.png"], ["x", "y"], tmp_path / "ok.png", "fine", images, hashes)
    old = hashes["b/2.png"]
    overwrite_keeping_size_and_mtime(images / "b/2.png", (images / "a/1.png").read_bytes()[:50])
    with pytest.raises(TlpipeError) as err:
        gallery.draw(["a/1.png", "b/2.png"], ["x", "y"], tmp_path / "g.png", "altered", images, hashes)
    new = tio.sha256_file(images / "b/2.png")
    assert str(err.value) == (f"{images / 'b/2.png'}: sha256 {new[:12]} is not the {old[:12]} recorded in "
                              "data/prepared/manifest.csv: the file was altered after it was written; rerun the "
                              "data stage (dvc repro --force data)")
    assert not (tmp_path / "g.png").exists() and not temporaries(tmp_path)


@pytest.mark.slow  # real dvc: status, repro after a params change, the suggested fix
def test_an_image_altered_in_place_through_dvc_repro(tmp_path, digit_folder):
    source = private_source(tmp_path, digit_folder)
    project = new_project(tmp_path, source)
    dvc(project, "repro", "decode")
    rel, donor = other_class_image(project, source)
    path = source / rel
    old = tio.sha256_file(path)
    decoded = tree(project / "data/decoded")
    dvc(project, "status", "decode")  # DVC records the files' inodes and mtimes
    overwrite_keeping_size_and_mtime(path, donor)
    assert "up to date" in dvc(project, "status", "decode").stdout  # DVC trusts the mtime
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("resize_size: 36", "resize_size: 40"))
    result = dvc(project, "repro", "decode", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    expected = tampered(project, path, "data/prepared/manifest.csv", "data", old)
    assert [line for line in result.stderr.splitlines() if line.startswith(f"error: {source}")] == [f"error: {expected}"]
    # DVC removes a stage's outputs before it runs it: nothing, or the old shards, never a part
    assert tree(project / "data/decoded") in ({}, decoded) and not temporaries(project / "data")
    dvc(project, "repro", "--force", "data")  # the fix the message gives: the image as it now is
    dvc(project, "repro", "decode")
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str).set_index("path")
    assert manifest.loc[rel, "sha256"] == tio.sha256_file(path) != old


# --- serious 2: a damaged but loadable ONNX file ------------------------------------------------------

@pytest.fixture(scope="module")
def exported(cold_project) -> Path:
    """The cold tiny project (conftest): run through export_head (the head and its ONNX file). Read only."""
    return cold_project.path


@pytest.fixture
def onnx_copy(cold_project, tmp_path) -> Path:
    return copy_project(cold_project.path, tmp_path / "copy")


def negate_largest_initializer(path: Path) -> str:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(largest), largest.name))
    onnx.save(proto, str(path))  # its metadata, the seal included, as it was
    return largest.name


@pytest.mark.slow  # a pipeline run to export_head
def test_export_seals_the_file_and_records_its_sha256(exported, digit_folder, tmp_path):
    import onnx

    model = exported / "models/head.onnx"
    numbers = json.loads((exported / "metrics/export_head.json").read_text())
    assert numbers["onnx_sha256"] == tio.sha256_file(model)
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta[SEAL_KEY] == numbers[SEAL_KEY]
    raw = model.read_bytes()
    unsealed = raw.replace(meta[SEAL_KEY].encode(), b"0" * 64)
    assert hashlib.sha256(unsealed).hexdigest() == meta[SEAL_KEY]
    proc = cli(exported, "predict", "--model", "models/head.onnx", str(digit_folder / "class1"),
               "--out", str(tmp_path / "p.csv"))
    assert_ok(proc)
    assert "12 images predicted with the models/head.onnx model, 0 errors" in proc.stdout


@pytest.mark.slow  # a pipeline run to export_head
@pytest.mark.parametrize("damage", ["negated weights", "flipped byte"])
def test_a_damaged_onnx_file_is_refused_by_predict(onnx_copy, digit_folder, damage):
    model = onnx_copy / "models/head.onnx"
    sealed = json.loads((onnx_copy / "metrics/export_head.json").read_text())[SEAL_KEY]
    if damage == "negated weights":
        negate_largest_initializer(model)
    else:
        flip(model, model.stat().st_size // 2)
    got = hashlib.sha256(model.read_bytes().replace(sealed.encode(), b"0" * 64)).hexdigest()
    proc = cli(onnx_copy, "predict", "--model", "models/head.onnx", str(digit_folder / "class1"), "--out", "d.csv")
    assert_error(proc, SEAL_MESSAGE.format(path="models/head.onnx", got=got[:12], sealed=sealed[:12]))
    assert not (onnx_copy / "d.csv").exists() and not temporaries(onnx_copy)


@pytest.mark.slow  # a pipeline run to export_head
def test_predict_names_what_is_not_a_regular_file(onnx_copy, tmp_path):
    fifo, fifo_model, folder = tmp_path / "pipe.png", tmp_path / "pipe.onnx", tmp_path / "x.onnx"
    os.mkfifo(fifo)
    os.mkfifo(fifo_model)
    folder.mkdir()
    assert_error(cli(onnx_copy, "predict", "--model", str(folder), "x.png"), f"{folder}: a folder, not an ONNX file")
    assert_error(cli(onnx_copy, "predict", "--model", str(fifo_model), "x.png"), f"{fifo_model}: a FIFO, not an "
                                                                                 "ONNX file")
    for model in ("head", "models/head.onnx"):
        proc = cli(onnx_copy, "predict", "--model", model, str(fifo), "/dev/null", "--out", "p.csv")
        assert_ok(proc)  # bad inputs are rows with an error, as unreadable files are
        table = pd.read_csv(onnx_copy / "p.csv", keep_default_na=False).set_index("path")
        assert table.loc[str(fifo), "error"] == "not a regular file (a FIFO)"
        assert table.loc["/dev/null", "error"] == "not a regular file (a character device)"


# --- minor --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("", "params.yaml: empty (no params); restore it (git checkout params.yaml)"),
    ("# all commented out\n", "params.yaml: empty (no params); restore it (git checkout params.yaml)"),
    ("- data\n- image\n", "params.yaml: holds a list, not a mapping of sections (data:, image:, ...); restore it "
                          "(git checkout params.yaml)"),
    ("digits\n", "params.yaml: holds a string, not a mapping of sections (data:, image:, ...); restore it "
                 "(git checkout params.yaml)"),
], ids=["empty", "comments", "list", "string"])
def test_an_empty_or_non_mapping_params_file_is_refused(tmp_path, digit_folder, text, message):
    project = new_project(tmp_path, digit_folder)
    assert_ok(stage(project, "data"))
    prepared = tree(project / "data/prepared")
    (project / "params.yaml").write_text(text)
    for name in ("data", "decode"):
        assert_error(stage(project, name), message)
    assert tree(project / "data/prepared") == prepared and not (project / "data/decoded").exists()


def test_predict_out_where_no_file_can_be_created(tmp_path, digit_folder):
    project = new_project(tmp_path, digit_folder)  # no model yet: --out is checked first
    (project / "notes").write_text("a file\n")
    assert_error(cli(project, "predict", "--model", "head", "x.png", "--out", "notes/p.csv"),
                 "--out notes/p.csv: notes is not a folder")
    if Path("/sys").is_dir():  # os.access says writable to root; creating a file there fails for anyone
        assert_error(cli(project, "predict", "--model", "head", "x.png", "--out", "/sys/p.csv"),
                     "--out /sys/p.csv: cannot write in /sys (Permission denied)")
    if os.geteuid() != 0:  # a mode root ignores
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            assert_error(cli(project, "predict", "--model", "head", "x.png", "--out", str(locked / "p.csv")),
                         f"--out {locked}/p.csv: cannot write in {locked} (Permission denied)")
        finally:
            locked.chmod(stat.S_IRWXU)


def test_non_regular_files_are_named_for_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert check_image(fifo) == "not a regular file (a FIFO)"  # and returns: a FIFO is never opened
    assert check_image("/dev/null") == "not a regular file (a character device)"
    assert check_image(write_png(tmp_path / "ok.png", seed=1)) is None


def test_pil_warnings_name_the_image_not_pil(tmp_path):
    root = class_folder(tmp_path / "src")
    exif_jpeg(root / "a" / "exif.jpg", (10, 0xFF))  # a count byte of the EXIF header: "Corrupt EXIF data"
    project = new_project(tmp_path, root)
    assert_ok(stage(project, "data"))
    proc = stage(project, "decode")
    assert_ok(proc)
    warned = [line for line in proc.stderr.splitlines() if "EXIF" in line]
    assert warned and set(warned) == {f"warning: {root / 'a/exif.jpg'}: Corrupt EXIF data. Expecting to "
                                      "read 2 bytes but only got 0."}
    assert "site-packages" not in proc.stderr


def test_the_label_conflict_example_shows_two_different_labels(tmp_path):
    root = class_folder(tmp_path / "src")
    same = (root / "a" / "0.png").read_bytes()
    (root / "a" / "00.png").write_bytes(same)  # two copies labelled a (sorted first), one labelled b
    (root / "b" / "z.png").write_bytes(same)
    proc = stage(new_project(tmp_path, root), "data")
    assert_ok(proc)
    assert ("warning: 1 image(s) are copies carrying different labels (label conflicts), e.g. a/0.png (a), "
            "b/z.png (b)") in proc.stdout.splitlines()


@pytest.mark.slow  # four stage processes (data, decode, stats, features)
def test_every_constant_channel_is_named(tmp_path):
    root = tmp_path / "src"
    for c, label in enumerate(("a", "b")):
        for i in range(6):
            (root / label).mkdir(parents=True, exist_ok=True)
            # one colour everywhere, sizes differing so that no two files are copies
            Image.new("RGB", (8 + i, 8 + c), (40, 90, 200)).save(root / label / f"{i}.png")
    project = new_project(tmp_path, root, backbone__normalize="dataset")
    for name in ("data", "decode", "stats"):
        assert_ok(stage(project, name))
    n = json.loads((project / "data/stats.json").read_text())["images"]
    assert_error(stage(project, "features"), f"data/stats.json: the red, green and blue channels have std 0.0 (each "
                                             f"is constant over the {n} training images), so backbone.normalize: "
                                             "dataset would divide by zero; normalize by the backbone's statistics "
                                             "instead")
    assert not (project / "data/features").exists() and not temporaries(project / "data")


def test_an_archive_of_many_unusable_members_is_summarized(tmp_path):
    members = {**dataset_members(), **{f"top/a/junk{i:04d}.png": b"not an image" for i in range(500)}}
    archive = make_zip(tmp_path / "many.zip", members, method=zipfile.ZIP_STORED)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    project = new_project(tmp_path, tmp_path, data__source="url", data__url=archive.as_uri(), data__sha256=digest)
    proc = stage(project, "data")
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert len(skipped) == 20 and skipped[0].endswith("/a/junk0000.png: not an image PIL can read")
    assert ("... and 480 more skipped (500 in all), every one with its reason in data/prepared/skipped.csv"
            in lines)
    table = pd.read_csv(project / "data/prepared/skipped.csv")
    assert len(table) == 500 and set(table["reason"]) == {"not an image PIL can read"}
