"""Images decoded once at the evaluation geometry, in a few shard files per split.

The idea of FFCV's dataset files: the decode stage turns every image into resized, centre-cropped
pixels once; stats, features, fine-tuning's validation pass and inference then read those instead
of decoding and resizing the source files again and again. A split's images go, in manifest
order, into `{split}-NNN.safetensors` files of at most about SHARD_BYTES each, beside a `meta.json`
with the geometry, the manifest's sha256, the shard sizes and the codec.

Two codecs (image.decoded_quality): `jpeg` (the default, as FFCV stores images) keeps each image as
a JPEG of the crop at that quality, tensors `jpeg` (every image's bytes, concatenated), `offsets`
(N + 1 byte offsets) and `ids` (their manifest rows): about what the source files cost on disk,
decoded by libjpeg-turbo (torchvision.io) at about 1 ms per 224 px image. `raw` (quality 0) keeps
uint8 CHW pixels, tensors `images` (N x 3 x S x S) and `ids`: exact, about 6x larger. Readers get
uint8 NCHW either way and hold one shard at a time, so memory does not grow with the number of images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from tlpipe.io import read_json, sha256_file, verify_sha256, writing
from tlpipe.paths import DECODED, PREPARED
from tlpipe.runtime import TlpipeError

SHARD_BYTES = 64 << 20  # big enough that DVC sees few files, small enough to stay in memory
# The train split again, at the training geometry (tlpipe.preprocessing.train_geometry): the pixels
# fine-tuning's random crops are cut from. meta.json's splits entry for it has its own preprocessing.
TRAIN_SOURCE = "train_source"
MIN_JPEG_BYTES = 256  # no JPEG is smaller (headers and tables alone take about 600 bytes)


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:03d}.safetensors"


def codec(quality: int) -> dict:
    """meta.json's record of how the pixels are stored (image.decoded_quality)."""
    return {"format": "jpeg", "quality": quality} if quality else {"format": "raw"}


class ShardWriter:
    """Appends images of one split, writing a shard file each time SHARD_BYTES are filled.

    quality 0 stores uint8 pixels; 1..100, each image as a JPEG of that quality (torchvision.io,
    deterministic: the same pixels give the same bytes, so the shards are identical run to run)."""

    def __init__(self, folder: Path, split: str, image_shape: tuple[int, int, int], quality: int = 0):
        self.folder, self.split, self.image_shape, self.quality = folder, split, image_shape, quality
        # jpeg: a shard is cut at SHARD_BYTES of JPEG bytes; the count cap only bounds the ids buffer
        self.capacity = max(1, SHARD_BYTES // (MIN_JPEG_BYTES if quality else math.prod(image_shape)))
        self.buffer = None if quality else torch.empty((self.capacity, *image_shape), dtype=torch.uint8)
        self.ids = torch.empty(self.capacity, dtype=torch.int64)
        self.filled = 0
        self.encoded: list[torch.Tensor] = []  # jpeg: the pending images' bytes
        self.encoded_bytes = 0
        self.sizes: list[int] = []
        self.files: dict[str, str] = {}  # sha256 of each shard written, for meta.json

    def add(self, images: torch.Tensor, ids: torch.Tensor) -> None:
        while len(images):
            take = min(len(images), self.capacity - self.filled)
            if self.quality:
                from torchvision.io import encode_jpeg  # torchvision takes a second to import: JPEG shards only

                jpegs = encode_jpeg(list(images[:take]), quality=self.quality) if take else []
                self.encoded += jpegs
                self.encoded_bytes += sum(len(j) for j in jpegs)
            else:
                self.buffer[self.filled:self.filled + take] = images[:take]
            self.ids[self.filled:self.filled + take] = ids[:take]
            self.filled += take
            images, ids = images[take:], ids[take:]
            if self.filled == self.capacity or self.encoded_bytes >= SHARD_BYTES:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0 and self.sizes:
            return
        n = self.filled  # an empty split still gets one (empty) shard, so readers need no special case
        path = self.folder / shard_name(self.split, len(self.sizes))
        if self.quality:
            lengths = torch.tensor([0] + [len(j) for j in self.encoded], dtype=torch.int64)
            data = torch.cat(self.encoded) if self.encoded else torch.empty(0, dtype=torch.uint8)
            tensors = {"jpeg": data, "offsets": lengths.cumsum(0)}
        else:
            tensors = {"images": self.buffer[:n].contiguous()}
        with writing(path):
            save_file({**tensors, "ids": self.ids[:n].contiguous()}, str(path))
        self.files[path.name] = sha256_file(path)
        self.sizes.append(n)
        self.filled, self.encoded, self.encoded_bytes = 0, [], 0


def read_meta(folder: Path = DECODED, prepared: Path = PREPARED) -> dict:
    """meta.json, checked against the current manifest."""
    try:
        meta = read_json(folder / "meta.json")
    except FileNotFoundError:
        raise TlpipeError(f"{folder / 'meta.json'}: missing; run the decode stage first (dvc repro decode)") from None
    if meta.get("manifest_sha256") != sha256_file(prepared / "manifest.csv"):
        raise TlpipeError(f"{folder}: decoded from another manifest than {prepared / 'manifest.csv'}; "
                          "rerun the decode stage")
    return meta


class DecodedSplit:
    """One split's decoded images, read by row ranges across shard boundaries."""

    def __init__(self, split: str, folder: Path = DECODED, meta: dict | None = None):
        meta = read_meta(folder) if meta is None else meta
        if split not in meta.get("splits", {}):  # shards of an older tlpipe, or a meta.json edited by hand
            raise TlpipeError(f"{folder / 'meta.json'}: has no {split!r} images; rerun the decode stage")
        self.split, self.folder = split, folder
        self.sizes = meta["splits"][split]["shards"]
        self.starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.geometry = meta["splits"][split].get("preprocessing", meta["preprocessing"])
        self.files = meta.get("files", {})
        self.format = meta.get("codec", {"format": "raw"})["format"]
        if self.format not in ("raw", "jpeg"):
            raise TlpipeError(f"{folder / 'meta.json'}: unknown codec {self.format!r}; rerun the decode stage")
        self._open: tuple[int, object] | None = None
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getstate__(self) -> dict:
        # A loader worker opens the shards itself rather than receive another process's mapping.
        return {**self.__dict__, "_open": None}

    def _shard(self, k: int):
        if self._open is None or self._open[0] != k:
            self._open = None  # drop the previous mapping before opening the next
            path = self.folder / shard_name(self.split, k)
            if k not in self._verified:  # once per reader: a shard altered in place is refused
                verify_sha256(path, self.files.get(path.name), self.folder / "meta.json", "decode")
                self._verified.add(k)
            try:
                self._open = (k, safe_open(str(path), framework="pt"))
            except (OSError, SafetensorError) as e:
                raise TlpipeError(f"{path}: unreadable ({e}); rerun the decode stage") from None
        return self._open[1]

    def ids(self) -> torch.Tensor:
        """The manifest rows of all the split's images, in order (without reading any pixels)."""
        parts = [self._shard(k).get_tensor("ids") for k in range(len(self.sizes))]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and manifest ids of rows lo..hi-1 of the split."""
        images, ids = [], []
        for k, (start, size) in enumerate(zip(self.starts, self.sizes)):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                f = self._shard(k)
                images.append(self._pixels(f, a - start, b - start))
                ids.append(f.get_slice("ids")[a - start:b - start])
        if not images:
            s = self.geometry["img_size"]
            return torch.empty((0, 3, s, s), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.cat(images), torch.cat(ids)

    def _pixels(self, f, a: int, b: int) -> torch.Tensor:
        """uint8 NCHW of a shard's images a..b-1."""
        if self.format == "raw":
            return f.get_slice("images")[a:b]
        offsets = f.get_slice("offsets")[a:b + 1]
        data = f.get_slice("jpeg")[int(offsets[0]):int(offsets[-1])]
        jpegs = torch.split(data, torch.diff(offsets).tolist())
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            return torch.stack(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB))
        except RuntimeError as e:  # verified shards decode; this is a libjpeg failure on this machine
            raise TlpipeError(f"{self.folder}: a {self.split} image does not decode ({e}); rerun the decode stage"
                              .splitlines()[0]) from None

    def batches(self, batch_size: int, first: int = 0, every: int = 1) -> "Batches":
        """(uint8 NCHW, ids) batches k = first, first + every, ...: rank r of w takes first=r, every=w."""
        return Batches(self, batch_size, first, every)

    def batch_lengths(self, batch_size: int) -> list[int]:
        n = len(self)
        return [min(batch_size, n - lo) for lo in range(0, n, batch_size)]


class Batches:
    """An iterable with a length (for progress bars) over some of a split's batches."""

    def __init__(self, split: DecodedSplit, batch_size: int, first: int, every: int):
        self.split, self.batch_size = split, batch_size
        self.ks = range(first, math.ceil(len(split) / batch_size), every)

    def __len__(self) -> int:
        return len(self.ks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        for k in self.ks:
            yield self.split.rows(k * self.batch_size, min(n, (k + 1) * self.batch_size))


def read_batches(split: str, batch_size: int, folder: Path = DECODED) -> Batches:
    """All of a split's decoded images, in manifest order, as (uint8 NCHW, ids) batches."""
    return DecodedSplit(split, folder).batches(batch_size)
