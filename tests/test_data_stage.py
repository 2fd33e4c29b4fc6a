"""The data stage on messy sources, run in-process in a temporary project directory.

Every kind of bad input ends either as a documented skip (listed in data/prepared/skipped.csv,
counted in metrics/data.json) or as one TlpipeError line naming the file, CSV line or class.
"""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import read_json, tool_env
from stages import data
from tlpipe.manifest import image_root
from tlpipe.runtime import TlpipeError

PROJECT = Path(__file__).resolve().parents[1]
BOMB_LIMIT = 5000  # PIL's pixel limit during these tests, so a "bomb" stays tiny on disk


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory to run stages in; returns a function that writes its params.yaml."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    monkeypatch.delenv("TLPIPE_PARAMS_LOG", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)

    def configure(**data_params):
        params = {"seed": 0, "data": {"val_fraction": 0.25, "test_fraction": 0.25, **data_params}}
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        return folder
    return configure


def noisy(size=(12, 10), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def save(path: Path, img: Image.Image, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


GOOD = ["alpha.png", "anim.gif", "deep.png", "dot.png", "gray.png", "old.bmp", "pal.png", "photo.webp",
        "plain.png", "print.jpg", "rotated.jpg"]


def good_images(folder: Path, seed: int) -> None:
    """One usable file of each awkward kind (the names in GOOD)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = noisy(seed=seed).convert("P")
    kinds = {
        "plain.png": lambda p: save(p, noisy(seed=seed)),
        "anim.gif": lambda p: save(p, noisy(seed=seed), "GIF"),
        "photo.webp": lambda p: save(p, noisy(seed=seed), "WEBP"),
        "old.bmp": lambda p: save(p, noisy(seed=seed), "BMP"),
        "print.jpg": lambda p: save(p, noisy(seed=seed, mode="CMYK"), "JPEG"),
        "deep.png": lambda p: save(p, Image.fromarray(
            (np.asarray(noisy(seed=seed, mode="L"), dtype=np.uint16) * 257))),
        "alpha.png": lambda p: save(p, noisy(seed=seed, mode="RGBA")),
        "pal.png": lambda p: save(p, palette, transparency=0),
        "gray.png": lambda p: save(p, noisy(seed=seed, mode="L")),
        "rotated.jpg": lambda p: save(p, noisy(seed=seed), "JPEG", exif=exif),
        "dot.png": lambda p: save(p, Image.new("RGB", (1, 1), (seed, 0, 0))),
    }
    assert sorted(kinds) == GOOD
    for name, make in kinds.items():
        make(folder / name)


def bad_images(folder: Path, outside: Path) -> dict[str, str]:
    """One bad file of each kind; returns name -> the start of the reason it is skipped for."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    noisy((64, 48)).save(jpeg, "JPEG")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.jpg").write_text("not an image\n" * 10)
    save(folder / "bomb.png", Image.new("L", (120, 120)))  # 14400 pixels > 2 x BOMB_LIMIT
    save(outside, noisy())
    (folder / "escape.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    return {
        "empty.jpg": "empty file (0 bytes)",
        "cut.jpg": "cannot decode: image file is truncated",
        "notes.jpg": "not an image PIL can read",
        "bomb.png": f"14400 pixels, more than PIL's limit of {BOMB_LIMIT} (a decompression bomb?)",
        "escape.png": f"symlink to {outside.resolve()}, outside the data root",
        "dangling.png": "file not found (broken symlink)",
    }


def junk(folder: Path) -> None:
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / ".hidden.png").write_bytes(b"junk")
    save(folder.parent / "__MACOSX" / folder.name / "._plain.png", noisy())


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    """Three classes of every awkward-but-usable kind; class `b` also holds every bad kind."""
    root = tmp_path / "messy"
    for seed, label in enumerate("abc"):
        good_images(root / label, seed)
        junk(root / label)
    bad = bad_images(root / "b", tmp_path / "secret.png")
    return root, bad


def read_prepared(project: Path):
    prepared = project / "data" / "prepared"
    return (pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False),
            pd.read_csv(prepared / "skipped.csv", dtype=str, keep_default_na=False),
            read_json(project / "metrics" / "data.json"))


def test_messy_folder_skips_each_bad_file_with_its_reason_and_ignores_junk(project, messy_folder, capsys):
    root, bad = messy_folder
    folder = project(source="folder", root=str(root))
    data.main()

    manifest, skipped, metrics = read_prepared(folder)
    assert sorted(manifest["path"]) == sorted(f"{c}/{n}" for c in "abc" for n in GOOD)
    got = {Path(f).name: r for f, r in zip(skipped["file"], skipped["reason"])}
    assert set(got) == set(bad)
    for name, reason in bad.items():
        assert got[name].startswith(reason), (name, got[name])
        assert "\n" not in got[name]
    assert metrics == {"files": 33 + len(bad), "skipped": len(bad), "classes": 3,
                       "train_images": 15, "val_images": 9, "test_images": 9,
                       "duplicates_across_splits": 0, "duplicates_within_split": 0,
                       "duplicates_label_conflicts": 0}
    out = capsys.readouterr().out
    for name in bad:
        assert f"skipped {root / 'b' / name}: {got[name]}" in out
    # junk is neither in the manifest nor listed as skipped
    assert not any(p.startswith(".") or "__MACOSX" in p or ".DS_Store" in p for p in manifest["path"])
    assert not any(".DS_Store" in f or "__MACOSX" in f for f in skipped["file"])
    # no copy of the images: the manifest points into data.root, with each file's sha256
    assert not (folder / "data" / "prepared" / "images").exists()
    assert image_root(folder / "data" / "prepared") == root
    for rel, digest in zip(manifest["path"], manifest["sha256"]):
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest


def test_messy_folder_with_on_bad_file_fail_names_the_file_and_writes_nothing(project, messy_folder):
    root, bad = messy_folder
    folder = project(source="folder", root=str(root), on_bad_file="fail")
    with pytest.raises(TlpipeError) as err:
        data.main()
    message = str(err.value)
    first = sorted(bad)[0]  # files are checked in sorted order
    assert message == (f"{root / 'b' / first}: {bad[first]} ({len(bad)} bad file(s) in all; "
                       "set data.on_bad_file: skip to skip and report them)")
    assert list((folder / "data").iterdir()) == [] and not (folder / "metrics").exists()


def test_decompression_bomb_fails_with_file_named_when_on_bad_file_is_fail(project, tmp_path):
    root = tmp_path / "src"
    for label in "ab":
        for i in range(4):
            save(root / label / f"{i}.png", noisy(seed=i))
    save(root / "a" / "huge.png", Image.new("RGB", (80, 80)))  # 6400: between 1x and 2x the limit
    project(source="folder", root=str(root), on_bad_file="fail")
    with pytest.raises(TlpipeError, match=rf"^{root / 'a' / 'huge.png'}: 6400 pixels, more than "
                                          rf"PIL's limit of {BOMB_LIMIT} \(a decompression bomb\?\) \(1 bad"):
        data.main()


def write_class(folder: Path, n: int, seed: int = 0) -> None:
    for i in range(n):
        save(folder / f"{i:02d}.png", noisy(seed=seed * 100 + i))


def test_duplicates_across_and_within_splits_are_listed_counted_and_warned(project, tmp_path, capsys):
    root = tmp_path / "ds"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for k, label in enumerate("ab"):
            write_class(root / split / label, n, seed=10 * k + len(split))
    same = noisy(seed=999)
    save(root / "train" / "a" / "leak.png", same)
    save(root / "test" / "a" / "leak.png", same)            # leakage: train and test
    save(root / "train" / "b" / "twice1.png", noisy(seed=7))
    save(root / "train" / "b" / "twice2.png", noisy(seed=7))  # twice within train only
    save(root / "train" / "a" / "conflict.png", noisy(seed=5))
    save(root / "train" / "b" / "conflict.png", noisy(seed=5))  # one image, two labels
    folder = project(source="presplit", root=str(root))
    data.main()

    dup = pd.read_csv(folder / "data" / "prepared" / "duplicates.csv", dtype=str)
    assert dup.columns.tolist() == ["sha256", "path", "label", "split", "across_splits"]
    rows = sorted(zip(dup["path"], dup["split"], dup["across_splits"]))
    # the conflicting pair may land in train and val (val is carved out of train)
    rows = [r for r in rows if "conflict" not in r[0]]
    assert rows == [("test/a/leak.png", "test", "True"), ("train/a/leak.png", "train", "True"),
                    ("train/b/twice1.png", "train", "False"), ("train/b/twice2.png", "train", "False")]
    metrics = read_json(folder / "metrics" / "data.json")
    assert metrics["duplicates_label_conflicts"] == 1
    assert metrics["duplicates_across_splits"] + metrics["duplicates_within_split"] == 3
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings[0].startswith("warning: ") and "1 test/train" in warnings[0]
    assert "train/test leakage; listed in data/prepared/duplicates.csv" in warnings[0]
    assert warnings[1] == ("warning: 1 image(s) are copies carrying different labels (label conflicts), "
                           "e.g. train/a/conflict.png (a), train/b/conflict.png (b)")


def test_no_duplicates_gives_an_empty_listing_with_header(project, tmp_path, capsys):
    root = tmp_path / "src"
    for k, label in enumerate("ab"):
        write_class(root / label, 4, seed=k)
    folder = project(source="folder", root=str(root))
    data.main()
    assert (folder / "data" / "prepared" / "duplicates.csv").read_text() == \
        "sha256,path,label,split,across_splits\n"
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("layout, match", [
    ({"only": 6}, r"^only one class \('only'\) found; classification needs two or more$"),
    ({"a": 6, "rare": 1}, r"^class 'rare' has 1 usable image\(s\): too few for train plus val and test"),
    ({"a": 6, "b": 6, "empty": 0}, r"^class folder .*/empty is empty$"),
])
def test_layout_problems_are_one_line_errors(project, tmp_path, layout, match):
    root = tmp_path / "src"
    for k, (label, n) in enumerate(layout.items()):
        (root / label).mkdir(parents=True)
        write_class(root / label, n, seed=k)
    project(source="folder", root=str(root))
    with pytest.raises(TlpipeError, match=match):
        data.main()


def test_class_with_only_bad_files_is_an_error_not_a_silent_drop(project, tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        write_class(root / split / "a", 3, seed=len(split))
        write_class(root / split / "b", 3, seed=len(split) + 50)
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "x.jpg").write_bytes(b"")
    write_class(root / "val" / "c", 1)
    project(source="presplit", root=str(root))
    with pytest.raises(TlpipeError) as err:
        data.main()
    assert str(err.value) == (f"class 'c' has no usable training image (2 file(s), 1 unusable; first: "
                              f"{root / 'train' / 'c' / 'x.jpg'}: empty file (0 bytes))")


def test_val_class_missing_from_train_is_an_error(project, tmp_path):
    root = tmp_path / "ds"
    write_class(root / "train" / "a", 4)
    write_class(root / "train" / "b", 4, seed=1)
    write_class(root / "val" / "a", 1)
    write_class(root / "val" / "ghost", 1, seed=2)
    project(source="presplit", root=str(root))
    with pytest.raises(TlpipeError, match=rf"^class 'ghost' is in {root / 'val'} but not in {root / 'train'}$"):
        data.main()


def csv_source(tmp_path: Path, rows: str) -> Path:
    root = tmp_path / "csvroot"
    for k, label in enumerate("ab"):
        for i in range(4):
            save(root / "img" / f"{label}{i}.png", noisy(seed=10 * k + i))
    save(tmp_path / "outside.png", noisy(seed=99))
    (root / "img" / "escape.png").symlink_to(tmp_path / "outside.png")
    lines = [f"img/{label}{i}.png,{label}" for label in "ab" for i in range(4)]
    (root / "labels.csv").write_text("file,label\n" + "\n".join(lines) + "\n" + rows)
    return root


def test_csv_missing_file_and_escaping_symlink_are_skipped_with_their_line(project, tmp_path):
    root = csv_source(tmp_path, "img/ghost.png,a\nimg/escape.png,b\n")
    folder = project(source="csv", root=str(root))
    data.main()
    manifest, skipped, metrics = read_prepared(folder)
    assert len(manifest) == 8 and metrics["skipped"] == 2
    assert skipped["reason"].tolist() == [
        "file not found (labels.csv line 10)",
        f"symlink to {(tmp_path / 'outside.png').resolve()}, outside the data root {root} (labels.csv line 11)"]
    assert not (folder / "data" / "prepared" / "images" / "img" / "escape.png").exists()


def test_csv_missing_file_with_on_bad_file_fail_names_file_and_line(project, tmp_path):
    root = csv_source(tmp_path, "img/ghost.png,a\n")
    project(source="csv", root=str(root), on_bad_file="fail")
    with pytest.raises(TlpipeError, match=rf"^{root / 'img' / 'ghost.png'}: file not found "
                                          r"\(labels.csv line 10\) \(1 bad file"):
        data.main()


@pytest.mark.parametrize("row, match", [
    ("img/a0.png,b\n", r"line 10: file 'img/a0.png' is already listed on line 2"),
    ("../outside.png,a\n", r"line 10: path '../outside.png' contains '..'"),
    ("/etc/hostname,a\n", r"line 10: absolute path '/etc/hostname'"),
    ("img/x.png,NaN\n", r"line 10: no label for 'img/x.png' \(got 'NaN'\)"),
])
def test_csv_row_errors_name_the_line(project, tmp_path, row, match):
    root = csv_source(tmp_path, row)
    project(source="csv", root=str(root))
    with pytest.raises(TlpipeError, match=rf"^{root / 'labels.csv'} {match}"):
        data.main()


def test_bad_input_through_the_stage_command_is_one_line_on_stderr(tmp_path):
    """What a user sees: exit status 2 and one `error:` line, no traceback."""
    root = tmp_path / "src"
    for k, label in enumerate("ab"):
        write_class(root / label, 4, seed=k)
    (root / "a" / "notes.jpg").write_text("hello")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "folder", "root": str(root), "on_bad_file": "fail"}}))
    env = tool_env(PYTHONPATH=str(PROJECT))
    proc = subprocess.run([sys.executable, "-m", "stages.data"], cwd=folder, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {root / 'a' / 'notes.jpg'}: not an image PIL can read (1 bad file(s) "
                           "in all; set data.on_bad_file: skip to skip and report them)\n")
    assert list((folder / "data").iterdir()) == []  # no prepared folder, no temp leftovers


def test_url_archive_with_junk_and_a_bad_file_goes_through_the_same_checks(project, tmp_path):
    import hashlib
    import zipfile

    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for k, label in enumerate("ab"):
            for i in range(4):
                buf = io.BytesIO()
                noisy(seed=10 * k + i).save(buf, "PNG")
                zf.writestr(f"pets/{label}/{i}.png", buf.getvalue())
        zf.writestr("pets/a/broken.jpg", b"\xff\xd8\xff\xe0 not really")
        zf.writestr("__MACOSX/pets/a/._0.png", b"resource fork")
        zf.writestr("pets/b/.DS_Store", b"junk")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    folder = project(source="url", url=archive.as_uri(), sha256=digest)
    data.main()
    manifest, skipped, metrics = read_prepared(folder)
    assert len(manifest) == 8 and metrics["skipped"] == 1
    extracted = Path("data") / "downloads" / digest / "pets"  # relative to the project
    assert skipped["file"].tolist() == [str(extracted / "a" / "broken.jpg")]
    assert skipped["reason"].tolist()[0].startswith("cannot decode")


def test_url_archive_with_an_escaping_member_names_archive_and_member(project, tmp_path):
    import hashlib
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pets/a/0.png", b"x")
        zf.writestr("pets/../../../escape.txt", b"x")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    folder = project(source="url", url=archive.as_uri(), sha256=digest)
    with pytest.raises(TlpipeError) as err:
        data.main()
    assert str(err.value) == (f"data/downloads/{digest}.zip: refusing member that climbs out with '..': "
                              "'pets/../../../escape.txt'")
    assert not (folder.parent / "escape.txt").exists() and not (folder / "escape.txt").exists()


def test_two_classes_one_all_bad_names_the_lost_class_not_only_one_class(project, tmp_path):
    root = tmp_path / "src"
    write_class(root / "a", 6)
    (root / "b").mkdir()
    for i in range(3):
        (root / "b" / f"{i}.jpg").write_text("not an image")
    project(source="folder", root=str(root))
    with pytest.raises(TlpipeError, match=r"^class 'b' has no usable training image \(3 file\(s\), 3 unusable; "
                                          rf"first: {root / 'b' / '0.jpg'}: not an image PIL can read\)$"):
        data.main()


@pytest.mark.parametrize("stage", ["data", "scratch"])
def test_stage_starts_without_torch_or_scikit_learn(stage):
    """A stage process starts for every `dvc repro`; these two need neither library (the default's
    digits are read without scikit-learn; scratch imports torch only when enabled), whose imports
    alone take seconds."""
    code = f"import sys, stages.{stage}; print(sorted({{'torch', 'sklearn'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
