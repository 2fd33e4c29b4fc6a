"""Where labelled images come from, and how they are split.

A source yields Items: a file on disk, the path it gets inside the prepared image folder, its label
and, for pre-split layouts, the split it was given.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from tlpipe.ingest.pixels import is_junk as _is_junk  # tlpipe.ingest.pixels: no torch in the data stage
from tlpipe.ingest.pixels import list_files as _files_under
from tlpipe.ingest.pixels import error_name, shown, utf8_name
from tlpipe.io import atomic_dir, atomic_path, sha256_file
from tlpipe.manifest import SPLITS
from tlpipe.runtime import TlpipeError

# CSV labels that mean "no value" (what spreadsheets and pandas write for a missing cell).
MISSING_LABELS = {"nan", "na", "n/a", "#n/a", "<na>", "none", "null"}


@dataclass(frozen=True)
class Item:
    src: Path
    rel: str
    label: str
    split: str | None = None
    where: str = field(default="", compare=False)  # e.g. "labels.csv line 7", for messages


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _is_junk(Path(p.name)))
    for folder in folders:
        # A class name ends up in classes.json, the manifest and metrics: it must be text.
        if not utf8_name(folder.name):
            raise TlpipeError(f"class folder {shown(folder)}: name is not valid UTF-8; rename it")
    return folders


def from_class_folders(root: Path, prefix: str = "", split: str | None = None) -> list[Item]:
    """One sub-folder per class; files in nested folders belong to the top class folder."""
    if not root.is_dir():
        raise TlpipeError(f"data.root: folder not found: {root}")
    items = []
    for cls in _class_folders(root):
        files = _files_under(cls)
        if not files:
            raise TlpipeError(f"class folder {cls} is empty")
        items += [Item(f, f"{prefix}{f.relative_to(root).as_posix()}", cls.name, split) for f in files]
    if not items:
        raise TlpipeError(f"data.root: no class sub-folders with files in {root}")
    return items


def from_presplit(root: Path) -> list[Item]:
    """`train/` and `val/` (and optionally `test/`) folders, each with one sub-folder per class.

    Without `test/`, the given `val/` becomes the test split and val is carved out of train later,
    so the split reported as test is never used for any choice.
    """
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise TlpipeError(f"data.root: a pre-split source needs train/ and val/ folders in {root}")
    has_test = (root / "test").is_dir()
    # Without test/, train items get no split yet: stratified_split carves val out of them.
    items = from_class_folders(root / "train", "train/", "train" if has_test else None)
    train_classes = {i.label for i in items}
    items += from_class_folders(root / "val", "val/", "val" if has_test else "test")
    if has_test:
        items += from_class_folders(root / "test", "test/", "test")
    for item in items:
        if item.label not in train_classes:
            folder = root / item.rel.split("/")[0]  # val/ may have become the test split: name the folder
            raise TlpipeError(f"class {item.label!r} is in {folder} but not in {root / 'train'}")
    return items


def from_csv(root: Path, csv_file: str, file_column: str, label_column: str) -> list[Item]:
    """Rows of (file, label). A row's errors name its line; a missing file is left to the decode
    check, which skips or fails it like any other bad file."""
    csv_rel = PurePosixPath(csv_file.replace("\\", "/"))
    if csv_rel.is_absolute() or Path(csv_file).is_absolute() or ".." in csv_rel.parts:
        raise TlpipeError(f"data.csv_file: {csv_file!r} must be a path inside data.root, without '..'")
    csv_path = root / csv_rel
    if not csv_path.is_file():
        raise TlpipeError(f"data.csv_file: not found: {csv_path}")
    try:
        # Blank lines kept (and skipped below) so that row numbers stay the file's line numbers;
        # utf-8-sig drops the byte-order mark spreadsheet programs put before the first header.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise TlpipeError(f"{csv_path}: empty file (no header line)") from None
    except Exception as e:  # ParserError, UnicodeDecodeError, csv.Error...: untrusted bytes
        raise TlpipeError(f"{csv_path}: not a readable CSV: {e}".splitlines()[0]) from None
    for param, column in (("data.file_column", file_column), ("data.label_column", label_column)):
        if column not in table.columns:
            raise TlpipeError(f"{param}: column {column!r} not in {csv_path} (has {list(table.columns)})")
    items, first_line = [], {}
    for row, (name, label) in enumerate(zip(table[file_column], table[label_column]), start=2):
        where = f"{csv_path} line {row}"
        rel = PurePosixPath(name.replace("\\", "/"))
        if not name.strip() and not label.strip():
            continue
        if not name.strip():
            raise TlpipeError(f"{where}: empty file name")
        if not label.strip() or label.strip().lower() in MISSING_LABELS:
            raise TlpipeError(f"{where}: no label for {name!r} (got {label!r}); "
                              f"label every row or remove the unlabelled ones")
        if rel.is_absolute() or Path(name).is_absolute():
            raise TlpipeError(f"{where}: absolute path {name!r}; paths must be relative to {root}")
        if ".." in rel.parts:
            raise TlpipeError(f"{where}: path {name!r} contains '..'; paths must stay inside {root}")
        # The same file twice would be copied once but could land in two splits, or two classes.
        if rel in first_line:
            raise TlpipeError(f"{where}: file {name!r} is already listed on line {first_line[rel]}")
        first_line[rel] = row
        items.append(Item(root / rel, rel.as_posix(), label.strip(), where=f"{csv_file} line {row}"))
    if not items:
        raise TlpipeError(f"{csv_path}: no rows")
    return items


def download(url: str, sha256: str, downloads: Path) -> Path:
    """Fetch `url` once into `downloads/`, verified by sha256; reuse the file when present."""
    sha256 = sha256.lower()
    suffix = "".join(PurePosixPath(urllib.parse.urlparse(url).path).suffixes[-2:]) or ".archive"
    target = downloads / f"{sha256}{suffix}"
    if target.exists() and sha256_file(target) == sha256:
        return target
    print(f"downloading {url}")
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TlpipeError(f"data.url: cannot download {url} ({e}); offline? "
                              f"place the archive at {target} instead") from None
        got = sha256_file(tmp)  # hexdigest() is lower case
        if got != sha256:
            raise TlpipeError(f"data.sha256: {url} has sha256 {got}, expected {sha256}")
    return target


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and ":" in p.parts[0]):
        raise TlpipeError(f"{archive}: refusing member with an absolute path: {name!r}")
    if ".." in p.parts:
        raise TlpipeError(f"{archive}: refusing member that climbs out with '..': {name!r}")
    return p


class _Budget:
    """Caps on what an archive may expand to: total bytes, and bytes per byte of archive."""

    def __init__(self, archive: Path, max_bytes: int, max_ratio: float):
        self.archive, self.max_bytes = archive, max_bytes
        self.limit = min(max_bytes, int(max_ratio * max(1, archive.stat().st_size)))
        self.max_ratio, self.used = max_ratio, 0

    def take(self, n: int, name: str) -> None:
        self.used += n
        if self.used > self.limit:
            which = ("data.extract_max_bytes" if self.limit == self.max_bytes else
                     f"data.extract_max_ratio ({self.max_ratio:g} x the archive's "
                     f"{self.archive.stat().st_size} bytes)")
            raise TlpipeError(f"{self.archive}: refusing to extract more than {self.limit} bytes, the "
                              f"cap set by {which}, reached at member {name!r} (a decompression bomb?)")


def _copy(src, out, budget: _Budget, name: str) -> None:
    while block := src.read(1 << 20):
        budget.take(len(block), name)
        out.write(block)


def _place(dest: Path, rel: PurePosixPath, name: str, archive: Path, files: set, folders: set) -> Path:
    """The member's path in dest; refuses a file and a folder with the same name, or a file twice."""
    parents = {rel.parents[i] for i in range(len(rel.parents) - 1)}
    if rel in files or rel in folders:
        raise TlpipeError(f"{archive}: member {name!r} appears twice, or is also a folder in the archive")
    if parents & files:
        raise TlpipeError(f"{archive}: member {name!r} is inside {str(min(parents & files))!r}, "
                          "which is also a file in the archive")
    files.add(rel)
    folders.update(parents)
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    return dest / rel


def _folder(rel: PurePosixPath, name: str, archive: Path, files: set, folders: set) -> None:
    """Record a folder member; refuses one that is also a file in the archive."""
    if rel in files:
        raise TlpipeError(f"{archive}: member {name!r} is both a file and a folder")
    folders.add(rel)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    files: set = set()
    folders: set = set()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Declared sizes first, so a bomb is refused before a byte is written; zipfile stops at
        # the declared size while reading, so a member cannot lie its way past the cap.
        declared = sum(i.file_size for i in infos)
        if declared > budget.limit:
            budget.take(declared, infos[-1].filename if infos else "")
        for info in infos:
            rel = _safe_member(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise TlpipeError(f"{archive}: refusing symlink member {info.filename!r}")
            if info.flag_bits & 0x1:
                raise TlpipeError(f"{archive}: refusing encrypted member {info.filename!r} (no password)")
            if info.is_dir():
                _folder(rel, info.filename, archive, files, folders)
                continue
            target = _place(dest, rel, info.filename, archive, files, folders)
            with zf.open(info) as src, open(target, "wb") as out:
                _copy(src, out, budget, info.filename)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    files: set = set()
    folders: set = set()
    # Stream mode: one pass, members checked and written as they come, so a bomb is stopped at the
    # cap instead of being decompressed whole to list its members first.
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            rel = _safe_member(member.name, archive)
            if member.issym() or member.islnk():
                raise TlpipeError(f"{archive}: refusing link member {member.name!r}")
            if member.isdir():
                _folder(rel, member.name, archive, files, folders)
                continue
            if not member.isfile():
                raise TlpipeError(f"{archive}: refusing special member {member.name!r}")
            budget.take(member.size, member.name)
            target = _place(dest, rel, member.name, archive, files, folders)
            with tf.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def extract(archive: Path, dest: Path, max_bytes: int = 20 << 30, max_ratio: float = 100.0) -> Path:
    """Extract a zip or tar archive; refuse absolute paths, `..`, links, encrypted members, a file
    and a folder of the same name, and more than `max_bytes` in all or `max_ratio` x the archive's
    size (decompression bombs). Returns the data root.

    All or nothing: the archive goes into a temporary folder renamed to `dest` once complete, so a
    failure (a bad CRC, a truncated .tar.gz, a full disk) leaves no half-extracted `dest`.
    """
    done = dest / ".extracted"
    if done.exists():
        return _single_top_folder(dest)
    budget = _Budget(archive, max_bytes, max_ratio)
    try:
        with atomic_dir(dest) as tmp:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp, budget)
            elif tarfile.is_tarfile(archive):
                _extract_tar(archive, tmp, budget)
            else:
                raise TlpipeError(f"data.url: {archive} is neither a zip nor a tar archive")
            (tmp / ".extracted").touch()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, zlib.error, EOFError,
            RuntimeError, NotImplementedError, ValueError, OSError) as e:
        raise TlpipeError(f"{archive}: cannot extract ({error_name(e)}: {e}); the archive is "
                          "damaged or unsupported".splitlines()[0]) from None
    return _single_top_folder(dest)


def _single_top_folder(dest: Path) -> Path:
    """Archives usually wrap everything in one folder; treat that folder as the root."""
    entries = [p for p in dest.iterdir() if not _is_junk(Path(p.name))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def stratified_split(items: list[Item], val_fraction: float, test_fraction: float,
                     seed: int) -> list[Item]:
    """Give every item without a split one, per class by seeded shuffle, each split non-empty.

    Each class gets its own generator seeded from (seed, class name), so adding images to one class
    never reshuffles another.
    """
    by_class: dict[str, list[Item]] = {}
    for item in items:
        if item.split is None:
            by_class.setdefault(item.label, []).append(item)
    out = [i for i in items if i.split is not None]
    fractions = {s: f for s, f in (("val", val_fraction), ("test", test_fraction))}
    # A pre-split source without test/ has test already: carve only val out of train.
    carve = [s for s in ("val", "test") if not any(i.split == s for i in out)]
    for label, group in sorted(by_class.items()):
        group = sorted(group, key=lambda i: i.rel)
        n = len(group)
        counts = {s: max(1, round(n * fractions[s])) for s in carve}
        if n - sum(counts.values()) < 1:
            need = ", ".join(f"{s}_fraction={fractions[s]}" for s in carve)
            raise TlpipeError(f"class {label!r} has {n} usable image(s): too few for train plus "
                              f"{' and '.join(carve)} ({need}); add images or lower the fractions")
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        order = rng.permutation(n)
        start = 0
        for split in carve:
            for k in order[start:start + counts[split]]:
                out.append(Item(group[k].src, group[k].rel, label, split))
            start += counts[split]
        for k in order[start:]:
            out.append(Item(group[k].src, group[k].rel, label, "train"))
    return sorted(out, key=lambda i: (SPLITS.index(i.split), i.label, i.rel))


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (images, 1797 x 8 x 8 in 0..16; their int labels), as its `load_digits`
    reads them, from the same bundled CSV. Read here without importing scikit-learn, whose import
    takes longer than the rest of the data stage on them; its own loader if the file has moved."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(csv, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def from_digits(folder: Path) -> list[Item]:
    """scikit-learn's 1797 bundled 8x8 digit scans (values 0..16), written as 8-bit grayscale PNGs
    into `folder`: the offline default, real images with no download."""
    from PIL import Image

    images, targets = digits()
    items = []
    for i, (pixels, target) in enumerate(zip(images, targets)):
        rel = f"digits/{target}/{i:04d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        scaled = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(scaled, "L").save(folder / rel)
        items.append(Item(folder / rel, rel, str(target)))
    return items


# The data sources by `data.source` name: each gives (items, the root they must all resolve inside)
# from (the source root, the prepared images folder, the data params). Adding a source is one entry
# here; params.yaml's `data.source` accepts exactly these names and "url".
SOURCES = {
    "digits": lambda root, images, d: (from_digits(images), images),
    "folder": lambda root, images, d: (from_class_folders(root), root),
    "presplit": lambda root, images, d: (from_presplit(root), root),
    "csv": lambda root, images, d: (from_csv(root, d["csv_file"], d["file_column"], d["label_column"]), root),
}
ARCHIVE_LAYOUTS = ("folder", "presplit", "csv")  # what a `url` archive may hold
SOURCE_NAMES = (*SOURCES, "url")


def collect(data, images: Path, downloads: Path) -> tuple[list[Item], Path]:
    """The items of the source params.yaml's `data` section names, and the root they resolve in.

    Every data.* param is read whichever source is chosen, so the data stage reads exactly the
    params dvc.yaml declares for it.
    """
    d = data.dump()
    source, root = d["source"], Path(d["root"])
    for key, value, known in (("source", source, SOURCE_NAMES), ("archive_layout", d["archive_layout"], ARCHIVE_LAYOUTS)):
        if value not in known:
            raise TlpipeError(f"params.yaml: data.{key}: unknown {value!r}; one of {', '.join(known)}")
    if source == "url":  # an archive, fetched once and verified, holding one of the layouts
        root = extract(download(d["url"], d["sha256"], downloads), downloads / d["sha256"],
                       d["extract_max_bytes"], d["extract_max_ratio"])
        source = d["archive_layout"]
    return SOURCES[source](root, images, d)
