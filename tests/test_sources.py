"""Unit tests for tlpipe.ingest.sources: listing, CSV, archives, download and the stratified split."""

import hashlib
import io
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.ingest import sources
from tlpipe.ingest.sources import Item
from tlpipe.runtime import TlpipeError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0), (0, 120, 120)]


def write_image(path: Path, colour=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_class_folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for k, (label, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / label / f"img{i:03d}{ext}", COLOURS[k % len(COLOURS)])
    return root


def fake_items(counts: dict[str, int], split=None) -> list[Item]:
    return [Item(Path(f"/nowhere/{label}/{i:03d}.png"), f"{label}/{i:03d}.png", label, split)
            for label, n in counts.items() for i in range(n)]


# --------------------------------------------------------------------------- from_class_folders

def test_from_class_folders_lists_images_with_labels_and_ignores_junk(tmp_path):
    root = make_class_folder(tmp_path / "src", {"cat": 2, "dog": 3})
    write_image(root / "cat" / "nested" / "deep.png")  # nested files belong to the top class
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / "dog" / "Thumbs.db").write_bytes(b"junk")
    (root / "dog" / ".git").mkdir()
    (root / "dog" / ".git" / "x.png").write_bytes(b"junk")
    write_image(root / "__MACOSX" / "cat" / "._img000.png")  # whole junk class folder
    write_image(root / ".cache" / "x.png")  # hidden class folder
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("loose file at top level is not a class")

    items = sources.from_class_folders(root)

    got = sorted((i.rel, i.label, i.split) for i in items)
    assert got == [
        ("cat/img000.png", "cat", None),
        ("cat/img001.png", "cat", None),
        ("cat/nested/deep.png", "cat", None),
        ("dog/img000.png", "dog", None),
        ("dog/img001.png", "dog", None),
        ("dog/img002.png", "dog", None),
    ]
    for item in items:
        assert item.src == root / item.rel
        assert item.src.is_file()


def test_from_class_folders_prefix_and_split(tmp_path):
    root = make_class_folder(tmp_path / "src", {"a": 1})
    items = sources.from_class_folders(root, prefix="train/", split="train")
    assert items == [Item(root / "a" / "img000.png", "train/a/img000.png", "a", "train")]


def test_from_class_folders_empty_class_is_an_error_naming_it(tmp_path):
    root = make_class_folder(tmp_path / "src", {"cat": 2})
    (root / "zebra").mkdir()
    (root / "zebra" / ".DS_Store").write_bytes(b"junk")  # only junk: still empty
    with pytest.raises(TlpipeError, match="zebra") as err:
        sources.from_class_folders(root)
    assert "empty" in str(err.value)


def test_from_class_folders_missing_root_and_no_classes(tmp_path):
    with pytest.raises(TlpipeError, match="data.root"):
        sources.from_class_folders(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "loose.png")
    with pytest.raises(TlpipeError, match="data.root"):
        sources.from_class_folders(tmp_path / "flat")


# --------------------------------------------------------------------------- from_presplit

def test_from_presplit_with_test_folder_keeps_all_three_splits(tmp_path):
    root = tmp_path / "ds"
    make_class_folder(root / "train", {"a": 3, "b": 3})
    make_class_folder(root / "val", {"a": 1, "b": 2})
    make_class_folder(root / "test", {"a": 2, "b": 1})

    items = sources.from_presplit(root)

    got = Counter((i.rel.split("/")[0], i.split, i.label) for i in items)
    assert got == {("train", "train", "a"): 3, ("train", "train", "b"): 3,
                   ("val", "val", "a"): 1, ("val", "val", "b"): 2,
                   ("test", "test", "a"): 2, ("test", "test", "b"): 1}
    for item in items:
        assert item.src == root / item.rel


def test_from_presplit_without_test_folder_val_becomes_test_and_train_is_unsplit(tmp_path):
    root = tmp_path / "ds"
    make_class_folder(root / "train", {"a": 4, "b": 5})
    make_class_folder(root / "val", {"a": 2, "b": 1})

    items = sources.from_presplit(root)

    train = [i for i in items if i.rel.startswith("train/")]
    given_val = [i for i in items if i.rel.startswith("val/")]
    assert len(train) == 9 and len(given_val) == 3
    assert all(i.split is None for i in train)
    assert all(i.split == "test" for i in given_val)
    assert Counter(i.label for i in given_val) == {"a": 2, "b": 1}


def test_from_presplit_class_missing_from_train_is_an_error(tmp_path):
    root = tmp_path / "ds"
    make_class_folder(root / "train", {"a": 3, "b": 3})
    make_class_folder(root / "val", {"a": 1, "b": 1, "ghost": 1})
    with pytest.raises(TlpipeError, match="ghost"):
        sources.from_presplit(root)


def test_from_presplit_needs_train_and_val(tmp_path):
    root = tmp_path / "ds"
    make_class_folder(root / "train", {"a": 3})
    with pytest.raises(TlpipeError, match="train/ and val/"):
        sources.from_presplit(root)


# --------------------------------------------------------------------------- from_csv

def write_csv(root: Path, text: str, name: str = "labels.csv") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def test_from_csv_rows_become_items(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "x" / "one.png")
    write_image(root / "two.jpg")
    write_csv(root, "file,label,extra\nx/one.png,cat,1\ntwo.jpg, dog ,2\n")

    items = sources.from_csv(root, "labels.csv", "file", "label")

    assert items == [Item(root / "x" / "one.png", "x/one.png", "cat"),
                     Item(root / "two.jpg", "two.jpg", "dog")]


def test_from_csv_custom_columns(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_csv(root, "path,klass\na.png,7\n", "meta.csv")
    assert sources.from_csv(root, "meta.csv", "path", "klass") == [Item(root / "a.png", "a.png", "7")]


def test_from_csv_dotdot_escaping_root_names_line(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_image(tmp_path / "outside.png")
    write_csv(root, "file,label\na.png,cat\n../outside.png,cat\n")
    with pytest.raises(TlpipeError, match=r"line 3") as err:
        sources.from_csv(root, "labels.csv", "file", "label")
    assert "../outside.png" in str(err.value)
    assert "'..'" in str(err.value)


def test_from_csv_absolute_path_names_line(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_image(root / "b.png")
    absolute = write_image(tmp_path / "abs.png")
    write_csv(root, f"file,label\na.png,cat\nb.png,dog\n{absolute},cat\n")
    with pytest.raises(TlpipeError, match=r"line 4") as err:
        sources.from_csv(root, "labels.csv", "file", "label")
    assert "absolute" in str(err.value)


@pytest.mark.parametrize("missing, param", [("file", "data.file_column"), ("label", "data.label_column")])
def test_from_csv_missing_column_is_named(tmp_path, missing, param):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_csv(root, "name,klass\na.png,cat\n")
    kwargs = {"file_column": "name", "label_column": "klass"}
    kwargs[f"{missing}_column"] = "nope"
    with pytest.raises(TlpipeError, match=param) as err:
        sources.from_csv(root, "labels.csv", **kwargs)
    assert "'nope'" in str(err.value)


def test_from_csv_missing_file_and_empty_label(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    with pytest.raises(TlpipeError, match="data.csv_file"):
        sources.from_csv(root, "labels.csv", "file", "label")
    write_csv(root, "file,label\na.png,cat\nb.png,\n")
    with pytest.raises(TlpipeError, match=r"line 3: no label for 'b.png'"):
        sources.from_csv(root, "labels.csv", "file", "label")


def test_from_csv_line_number_counts_blank_lines(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    # line 1 header, 2 a.png, 3 blank, 4 the bad row
    write_csv(root, "file,label\na.png,cat\n\n/etc/passwd,cat\n")
    with pytest.raises(TlpipeError, match=r"line 4\b"):
        sources.from_csv(root, "labels.csv", "file", "label")


def test_from_csv_dotdot_inside_root_never_yields_rel_outside_prepared_folder(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_image(root / "sub" / "b.png")
    write_csv(root, "file,label\n../imgs/a.png,cat\nsub/../sub/b.png,dog\n")
    try:
        items = sources.from_csv(root, "labels.csv", "file", "label")
    except TlpipeError:
        return  # refusing such paths is an acceptable fix too
    for item in items:
        rel = Path(item.rel)
        assert not rel.is_absolute()
        assert ".." not in rel.parts, item.rel


# --------------------------------------------------------------------------- digits


def test_digits_equal_scikit_learns_without_importing_it():
    """The default source reads scikit-learn's bundled CSV itself (its import costs seconds)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    images, targets = sources.digits()
    expected = load_digits()
    assert images.shape == (1797, 8, 8) and targets.dtype.kind == "i"
    np.testing.assert_array_equal(images, expected.images)
    np.testing.assert_array_equal(targets, expected.target)
    code = "import sys; from tlpipe.ingest import sources; sources.digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(sources.__file__).parent.parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_fall_back_to_scikit_learns_loader_when_the_csv_moved(monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    images, targets = sources.digits()
    np.testing.assert_array_equal(images, load_digits().images)
    np.testing.assert_array_equal(targets, load_digits().target)


# --------------------------------------------------------------------------- stratified_split

def split_of(items: list[Item]) -> dict[str, str]:
    return {i.rel: i.split for i in items}


def test_stratified_split_every_class_in_every_split_with_fractional_counts():
    items = fake_items({"a": 20, "b": 7, "c": 3})
    out = sources.stratified_split(items, 0.25, 0.15, seed=0)

    assert sorted(i.rel for i in out) == sorted(i.rel for i in items)
    counts = Counter((i.label, i.split) for i in out)
    # max(1, round(n * fraction)) for val and test, the rest train
    assert counts == {("a", "val"): 5, ("a", "test"): 3, ("a", "train"): 12,
                      ("b", "val"): 2, ("b", "test"): 1, ("b", "train"): 4,
                      ("c", "val"): 1, ("c", "test"): 1, ("c", "train"): 1}
    for item, original in zip(sorted(out, key=lambda i: i.rel), sorted(items, key=lambda i: i.rel)):
        assert (item.src, item.rel, item.label) == (original.src, original.rel, original.label)
    # output order: train, val, test
    order = [sources.SPLITS.index(i.split) for i in out]
    assert order == sorted(order)


def test_stratified_split_is_deterministic_and_seed_dependent():
    items = fake_items({"a": 30, "b": 30})
    first = split_of(sources.stratified_split(items, 0.2, 0.2, seed=3))
    again = split_of(sources.stratified_split(list(reversed(items)), 0.2, 0.2, seed=3))
    other = split_of(sources.stratified_split(items, 0.2, 0.2, seed=4))
    assert first == again
    assert first != other
    # a different seed keeps the per-class counts
    assert Counter(first.values()) == Counter(other.values())


def test_stratified_split_adding_images_to_one_class_keeps_the_others():
    before = split_of(sources.stratified_split(fake_items({"a": 10, "b": 12, "c": 9}), 0.2, 0.2, 7))
    after = split_of(sources.stratified_split(fake_items({"a": 25, "b": 12, "c": 9}), 0.2, 0.2, 7))
    for rel, split in before.items():
        if not rel.startswith("a/"):
            assert after[rel] == split, rel
    assert {r: s for r, s in before.items() if r.startswith("a/")} != \
           {r: s for r, s in after.items() if r.startswith("a/") and r in before}


def test_stratified_split_too_few_images_names_the_class():
    items = fake_items({"plenty": 10, "rare_bird": 2})
    with pytest.raises(TlpipeError, match="rare_bird") as err:
        sources.stratified_split(items, 0.2, 0.2, seed=0)
    assert "plenty" not in str(err.value)


def test_stratified_split_presplit_with_test_carves_only_val():
    train = fake_items({"a": 10, "b": 8})
    given_test = [Item(Path(f"/nowhere/val/{i.rel}"), f"val/{i.rel}", i.label, "test")
                  for i in fake_items({"a": 3, "b": 2})]
    out = sources.stratified_split(train + given_test, 0.2, 0.3, seed=1)

    counts = Counter((i.label, i.split) for i in out)
    assert counts == {("a", "val"): 2, ("a", "train"): 8, ("b", "val"): 2, ("b", "train"): 6,
                      ("a", "test"): 3, ("b", "test"): 2}
    assert {i.rel for i in out if i.split == "test"} == {i.rel for i in given_test}


def test_stratified_split_presplit_with_all_splits_given_is_unchanged():
    items = fake_items({"a": 2}, "train") + fake_items({"b": 2}, "val") + fake_items({"c": 1}, "test")
    out = sources.stratified_split(items, 0.4, 0.4, seed=0)
    assert sorted(out, key=lambda i: i.rel) == sorted(items, key=lambda i: i.rel)


def test_stratified_split_end_to_end_on_presplit_folder(tmp_path):
    root = tmp_path / "ds"
    make_class_folder(root / "train", {"a": 10, "b": 10})
    make_class_folder(root / "val", {"a": 3, "b": 3})
    out = sources.stratified_split(sources.from_presplit(root), 0.2, 0.2, seed=0)
    assert all(i.rel.startswith("val/") for i in out if i.split == "test")
    assert all(i.rel.startswith("train/") for i in out if i.split in ("train", "val"))
    assert Counter(i.split for i in out) == {"train": 16, "val": 4, "test": 6}


# --------------------------------------------------------------------------- extract

def zip_with(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def assert_refused(archive: Path, dest: Path, match: str) -> None:
    for _ in range(2):  # a refused archive is never marked as extracted
        with pytest.raises(TlpipeError, match=match):
            sources.extract(archive, dest)
    assert not (dest / ".extracted").exists()


def test_extract_zip_refuses_dotdot(tmp_path):
    archive = zip_with(tmp_path / "a.zip", [("top/ok.txt", b"ok"), ("top/../../evil", b"bad")])
    dest = tmp_path / "out" / "x"
    assert_refused(archive, dest, r"'\.\.'")
    assert not (tmp_path / "out" / "evil").exists()
    assert not (tmp_path / "evil").exists()


def test_extract_zip_refuses_absolute_member(tmp_path):
    info = zipfile.ZipInfo("/etc/x")
    archive = zip_with(tmp_path / "a.zip", [(info, b"bad")])
    assert info.filename == "/etc/x"
    assert_refused(archive, tmp_path / "out", "absolute")


def test_extract_zip_refuses_symlink_member(tmp_path):
    link = zipfile.ZipInfo("top/link")
    link.external_attr = 0o120777 << 16
    archive = zip_with(tmp_path / "a.zip", [("top/a.txt", b"a"), (link, b"/etc/passwd")])
    assert_refused(archive, tmp_path / "out", "symlink")
    assert not (tmp_path / "out" / "top" / "link").exists()


def test_extract_tar_refuses_symlink_member(tmp_path):
    link = tarfile.TarInfo("top/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tar_with(tmp_path / "a.tar", [tar_file_member("top/a.txt", b"a"), (link, None)])
    assert_refused(archive, tmp_path / "out", "link")
    assert not (tmp_path / "out" / "top" / "link").is_symlink()


def test_extract_tar_refuses_dotdot(tmp_path):
    archive = tar_with(tmp_path / "a.tar.gz", [tar_file_member("../evil", b"bad")], mode="w:gz")
    assert_refused(archive, tmp_path / "out" / "x", r"'\.\.'")
    assert not (tmp_path / "out" / "evil").exists()


def test_extract_tar_refuses_absolute_member(tmp_path):
    archive = tar_with(tmp_path / "a.tar", [tar_file_member("/tmp/evil", b"bad")])
    assert_refused(archive, tmp_path / "out", "absolute")


def test_extract_refuses_non_archive(tmp_path):
    junk = tmp_path / "x.zip"
    junk.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(TlpipeError, match="neither a zip nor a tar"):
        sources.extract(junk, tmp_path / "out")


def png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "PNG")
    return buf.getvalue()


def test_extract_normal_zip_with_single_top_folder(tmp_path):
    cat, dog = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    archive = zip_with(tmp_path / "pets.zip", [
        ("pets/", b""), ("pets/cat/", b""), ("pets/cat/1.png", cat), ("pets/dog/1.png", dog),
        ("__MACOSX/pets/._x", b"mac junk"),
    ])
    dest = tmp_path / "downloads" / "abc"
    root = sources.extract(archive, dest)
    assert root == dest / "pets"
    assert (root / "cat" / "1.png").read_bytes() == cat
    assert (root / "dog" / "1.png").read_bytes() == dog
    assert (dest / ".extracted").exists()
    # the extracted folder is a valid class-folder source
    assert sorted((i.rel, i.label) for i in sources.from_class_folders(root)) == [
        ("cat/1.png", "cat"), ("dog/1.png", "dog")]
    # a second call reuses the extraction
    (root / "cat" / "1.png").unlink()
    assert sources.extract(archive, dest) == root
    assert not (root / "cat" / "1.png").exists()


def test_extract_normal_tar_without_top_folder_returns_dest(tmp_path):
    archive = tar_with(tmp_path / "a.tar", [tar_file_member("cat/1.png", png_bytes((1, 2, 3))),
                                            tar_file_member("dog/1.png", png_bytes((4, 5, 6)))])
    dest = tmp_path / "out"
    assert sources.extract(archive, dest) == dest
    assert (dest / "dog" / "1.png").read_bytes() == png_bytes((4, 5, 6))


# --------------------------------------------------------------------------- download

def test_download_file_url_with_correct_sha256_is_placed_and_reused(tmp_path):
    payload = np.random.default_rng(0).bytes(5000)
    src = tmp_path / "remote" / "data.tar.gz"
    src.parent.mkdir()
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    downloads = tmp_path / "downloads"

    target = sources.download(src.as_uri(), digest, downloads)

    assert target == downloads / f"{digest}.tar.gz"
    assert target.read_bytes() == payload
    assert sorted(p.name for p in downloads.iterdir()) == [target.name]

    src.unlink()  # the remote is gone: the verified local copy is reused
    assert sources.download(src.as_uri(), digest, downloads) == target
    assert target.read_bytes() == payload


def test_download_replaces_a_corrupt_local_copy(tmp_path):
    payload = b"archive bytes" * 100
    src = tmp_path / "data.zip"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / f"{digest}.zip").write_bytes(b"half a file")
    target = sources.download(src.as_uri(), digest, downloads)
    assert target.read_bytes() == payload


def test_download_wrong_sha256_is_an_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "data.zip"
    src.write_bytes(b"some bytes")
    wrong = "0" * 64
    downloads = tmp_path / "downloads"
    with pytest.raises(TlpipeError, match="data.sha256") as err:
        sources.download(src.as_uri(), wrong, downloads)
    assert hashlib.sha256(b"some bytes").hexdigest() in str(err.value)
    assert list(downloads.iterdir()) == []


def test_download_missing_file_is_an_error(tmp_path):
    with pytest.raises(TlpipeError, match="data.url"):
        sources.download((tmp_path / "absent.zip").as_uri(), "0" * 64, tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []


def test_download_accepts_uppercase_sha256(tmp_path):
    src = tmp_path / "data.zip"
    src.write_bytes(b"some bytes")
    digest = hashlib.sha256(b"some bytes").hexdigest().upper()
    target = sources.download(src.as_uri(), digest, tmp_path / "downloads")
    assert target.read_bytes() == b"some bytes"


# --------------------------------------------------------------------------- messy CSVs and archives

@pytest.mark.parametrize("label", ["", "  ", "NaN", "nan", "NA", "N/A", "None", "null"])
def test_from_csv_missing_label_names_the_line_and_file(tmp_path, label):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_image(root / "b.png")
    write_csv(root, f"file,label\na.png,cat\nb.png,{label}\n")
    with pytest.raises(TlpipeError) as err:
        sources.from_csv(root, "labels.csv", "file", "label")
    assert str(err.value).startswith(f"{root / 'labels.csv'} line 3: no label for 'b.png'")


def test_from_csv_label_that_merely_contains_nan_is_a_class(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_csv(root, "file,label\na.png,banana\n")
    assert [i.label for i in sources.from_csv(root, "labels.csv", "file", "label")] == ["banana"]


def test_from_csv_missing_file_is_left_to_the_decode_check_with_its_line(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_csv(root, "file,label\na.png,cat\nghost.png,dog\n")
    items = sources.from_csv(root, "labels.csv", "file", "label")
    assert [(i.rel, i.where) for i in items] == [("a.png", "labels.csv line 2"),
                                                 ("ghost.png", "labels.csv line 3")]
    assert not items[1].src.exists()


def test_from_csv_file_listed_twice_names_both_lines(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    write_csv(root, "file,label\na.png,cat\n\n./a.png,dog\n")
    with pytest.raises(TlpipeError, match=r"line 4: file './a.png' is already listed on line 2"):
        sources.from_csv(root, "labels.csv", "file", "label")


@pytest.mark.parametrize("csv_file", ["../labels.csv", "/etc/passwd", "sub/../../x.csv"])
def test_csv_file_param_outside_the_root_is_refused(tmp_path, csv_file):
    root = tmp_path / "imgs"
    write_csv(root, "file,label\n")
    write_csv(tmp_path, "file,label\nimgs/a.png,cat\n")
    with pytest.raises(TlpipeError, match=r"^data\.csv_file: .* must be a path inside data\.root"):
        sources.from_csv(root, csv_file, "file", "label")


def test_from_csv_with_byte_order_mark_finds_the_header(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a.png")
    root.joinpath("labels.csv").write_bytes("file,label\na.png,cat\n".encode("utf-8-sig"))
    assert sources.from_csv(root, "labels.csv", "file", "label") == [Item(root / "a.png", "a.png", "cat")]


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b"file,label\n", "no rows"),
    (b"file,label\n\xff\xfe\x00bad,cat\n", "not a readable CSV"),
    (b'file,label\n"a.png,cat\n', "not a readable CSV"),
])
def test_from_csv_unreadable_files_are_one_line_errors(tmp_path, content, match):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "labels.csv").write_bytes(content)
    with pytest.raises(TlpipeError, match=match) as err:
        sources.from_csv(root, "labels.csv", "file", "label")
    assert "\n" not in str(err.value) and str(root / "labels.csv") in str(err.value)


def test_from_csv_symlink_out_of_the_root_is_left_to_the_decode_check(tmp_path):
    # The path itself is clean; where it resolves is checked per file (skipped or failed, listed).
    root = tmp_path / "imgs"
    write_image(tmp_path / "outside.png")
    root.mkdir()
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    write_csv(root, "file,label\nlink.png,cat\n")
    assert [i.rel for i in sources.from_csv(root, "labels.csv", "file", "label")] == ["link.png"]


def test_from_class_folders_lists_broken_symlinks_so_they_are_reported(tmp_path):
    root = make_class_folder(tmp_path / "src", {"cat": 1, "dog": 1})
    (root / "cat" / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert sorted(i.rel for i in sources.from_class_folders(root)) == [
        "cat/dangling.png", "cat/img000.png", "dog/img000.png"]


@pytest.mark.parametrize("member", ["..\\evil", "top\\..\\..\\evil", "C:/evil", "C:\\evil"])
def test_extract_zip_refuses_windows_style_escapes(tmp_path, member):
    archive = zip_with(tmp_path / "a.zip", [("top/ok.txt", b"ok"), (member, b"bad")])
    with pytest.raises(TlpipeError) as err:
        sources.extract(archive, tmp_path / "out" / "x")
    assert str(err.value).startswith(f"{archive}: refusing member")
    assert repr(member) in str(err.value)
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()


def test_extract_tar_refuses_hardlink_and_device_members(tmp_path):
    link = tarfile.TarInfo("top/hard")
    link.type = tarfile.LNKTYPE
    link.linkname = "top/a.txt"
    archive = tar_with(tmp_path / "h.tar", [tar_file_member("top/a.txt", b"a"), (link, None)])
    assert_refused(archive, tmp_path / "out", r"refusing link member 'top/hard'")
    fifo = tarfile.TarInfo("top/pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = tar_with(tmp_path / "f.tar", [(fifo, None)])
    assert_refused(archive, tmp_path / "out2", r"refusing special member 'top/pipe'")


def test_refusals_name_the_archive_and_the_member(tmp_path):
    link = zipfile.ZipInfo("top/link")
    link.external_attr = 0o120777 << 16
    cases = [
        (zip_with(tmp_path / "dotdot.zip", [("top/../../evil", b"x")]), "'top/../../evil'"),
        (zip_with(tmp_path / "abs.zip", [(zipfile.ZipInfo("/etc/x"), b"x")]), "'/etc/x'"),
        (zip_with(tmp_path / "sym.zip", [(link, b"/etc/passwd")]), "'top/link'"),
        (tar_with(tmp_path / "abs.tar", [tar_file_member("/tmp/evil", b"x")]), "'/tmp/evil'"),
    ]
    for archive, member in cases:
        with pytest.raises(TlpipeError) as err:
            sources.extract(archive, tmp_path / "out" / archive.name)
        message = str(err.value)
        assert message.startswith(f"{archive}: refusing") and message.endswith(member), message
