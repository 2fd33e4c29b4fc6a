"""The decode stage: every image decoded once into shards (exact uint8 pixels, or JPEGs of them), and
the fast JPEG path it uses."""

import json

import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_sample_image

from stages import data, decode
from tlpipe import preprocessing
from tlpipe.ingest import decoded
from tlpipe.ingest.decoded import DecodedSplit
from tlpipe.ingest.images import TrainImages, eval_images, eval_transform, load_rgb, load_rgb_drafted, train_transform
from tlpipe.ingest.moments import ChannelMoments
from tlpipe.manifest import image_paths, read_manifest
from tlpipe.runtime import TlpipeError

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def large_photo() -> Image.Image:
    """A real photo (scikit-learn's bundled china.jpg, 640x427) enlarged to 2560x1708."""
    photo = Image.fromarray(load_sample_image("china.jpg"))
    return photo.resize((2560, 1708), Image.Resampling.BICUBIC)


def save_jpeg(img: Image.Image, path, orientation: int = 1):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, "JPEG", quality=92, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_drafted_decode_agrees_with_the_full_decode(tmp_path, large_photo, orientation):
    """Every EXIF orientation: the reduced-scale decode lands on the same pixels, within a level or so."""
    path = save_jpeg(large_photo, tmp_path / "big.jpg", orientation)
    transform = eval_transform(224, 256, "bicubic")
    full = transform(load_rgb(path))
    drafted = transform(load_rgb_drafted(path, 256, "bicubic"))
    assert full.shape == drafted.shape == (3, 224, 224)
    diff = (full.int() - drafted.int()).abs().float()
    assert not torch.equal(full, drafted)  # the reduced decode really happened
    # Stated tolerance: mean absolute difference below 1 grey level, 99th percentile below 8. A
    # misplaced crop or a wrong rotation of the box shifts edges and fails this by a wide margin.
    assert diff.mean() < 1.0
    assert diff.flatten().quantile(0.99) < 8


def test_small_or_non_jpeg_images_are_decoded_in_full(tmp_path, large_photo):
    small = save_jpeg(large_photo.resize((900, 600)), tmp_path / "small.jpg")  # < 4x resize_size
    png = tmp_path / "big.png"
    large_photo.save(png)
    transform = eval_transform(224, 256, "bicubic")
    for path in (small, png):
        assert torch.equal(transform(load_rgb_drafted(path, 256, "bicubic")), transform(load_rgb(path)))


@pytest.fixture
def project(tmp_path, monkeypatch, digit_folder, large_photo):
    """A folder source of digit scans (PNG) and three large JPEGs per class; data stage already run."""
    root = tmp_path / "images"
    for cls in ("class0", "class1", "class2"):
        (root / cls).mkdir(parents=True)
        for png in sorted((digit_folder / cls).glob("*.png")):
            (root / cls / png.name).write_bytes(png.read_bytes())
        for k in range(3):
            crop = large_photo.crop((k * 300, 0, k * 300 + 1400, 1100)).rotate(90 * int(cls[-1]), expand=True)
            save_jpeg(crop, root / cls / f"photo{k}.jpg")
    params = {"data": {"source": "folder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25},
              # exact pixels (image.decoded_quality 0), which most tests compare bit for bit; the
              # JPEG shards (the default) have their own test below
              "image": {"img_size": 64, "resize_size": 72, "jpeg_draft": True, "decoded_quality": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    monkeypatch.setenv("TLPIPE_WORKERS", "0")
    data.main()
    # Shards of 10 images, so splits span several and batches cross shard boundaries.
    monkeypatch.setattr(decoded, "SHARD_BYTES", 10 * 3 * 64 * 64)
    return tmp_path


def test_shards_hold_exactly_what_the_evaluation_path_decodes(project):
    decode.main()
    manifest, _ = read_manifest()
    meta = decoded.read_meta()
    geometry = {"img_size": 64, "resize_size": 72, "interpolation": "bicubic", "jpeg_draft": True}
    assert meta["preprocessing"] == geometry
    paths = image_paths(manifest)
    for split in ("train", "val", "test"):
        images = DecodedSplit(split)
        rows = manifest.index[manifest["split"] == split].to_numpy()
        assert len(images) == len(rows) == meta["splits"][split]["images"]
        assert len(meta["splits"][split]["shards"]) >= 2 and max(meta["splits"][split]["shards"]) == 10
        pixels, ids = images.rows(0, len(images))
        assert ids.tolist() == rows.tolist()  # manifest order within the split
        expected = eval_images([paths[i] for i in rows], geometry)
        assert torch.equal(pixels, torch.stack([expected[i][0] for i in range(len(rows))]))


def test_jpeg_shards_hold_the_evaluation_pixels_within_a_stated_tolerance(project, monkeypatch):
    """image.decoded_quality 95: JPEG shards, cut by bytes, byte-identical run to run, decoding to the
    exact pixels within about a grey level on average."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["image"]["decoded_quality"] = 95
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(decoded, "SHARD_BYTES", 4_000)  # a few images per shard
    decode.main()
    first = {p.name: p.read_bytes() for p in sorted(decoded.DECODED.iterdir())}
    decode.main()
    assert {p.name: p.read_bytes() for p in sorted(decoded.DECODED.iterdir())} == first
    meta = decoded.read_meta()
    assert meta["codec"] == {"format": "jpeg", "quality": 95}
    manifest, _ = read_manifest()
    paths = image_paths(manifest)
    for split, geometry in (("train", meta["preprocessing"]),
                            (decoded.TRAIN_SOURCE, meta["splits"][decoded.TRAIN_SOURCE]["preprocessing"])):
        images = DecodedSplit(split)
        assert len(meta["splits"][split]["shards"]) >= 2
        pixels, ids = images.rows(0, len(images))
        rows = manifest.index[manifest["split"] == "train"].to_numpy()
        assert ids.tolist() == rows.tolist() and pixels.dtype == torch.uint8
        assert torch.equal(torch.cat([b for b, _ in images.batches(3)]), pixels)  # across shard cuts
        expected = eval_images([paths[i] for i in rows], geometry)
        exact = torch.stack([expected[i][0] for i in range(len(rows))])
        assert pixels.shape == exact.shape
        diff = (pixels.int() - exact.int()).abs().float()
        # Stated tolerance, on these small crops of sharp scans and textured photos (measured: mean 1.0,
        # 99th percentile 13-14 grey levels: 4:2:0 chroma at sharp colour edges): mean below 1.5, 99th
        # percentile below 16. A wrong crop, order or channel is off by tens of levels on average.
        assert 0 < diff.mean() < 1.5 and diff.flatten().quantile(0.99) < 16
    raw = sum((project / "data/decoded" / n).stat().st_size for n in first if n.endswith(".safetensors"))
    assert raw == meta["bytes"] < sum(s["images"] for s in meta["splits"].values()) * 3 * 64 * 64 / 3


def test_the_train_split_is_decoded_again_at_the_wider_training_geometry(project):
    decode.main()
    manifest, _ = read_manifest()
    source = DecodedSplit(decoded.TRAIN_SOURCE)
    geometry = {"img_size": 74, "resize_size": 74, "interpolation": "bicubic", "jpeg_draft": True}  # 64 x 1.15
    assert source.geometry == geometry == preprocessing.train_geometry(decoded.read_meta()["preprocessing"])
    rows = manifest.index[manifest["split"] == "train"].to_numpy()
    pixels, ids = source.rows(0, len(source))
    assert ids.tolist() == rows.tolist()
    expected = eval_images([image_paths(manifest)[i] for i in rows], geometry)
    assert torch.equal(pixels, torch.stack([expected[i][0] for i in range(len(rows))]))


def test_training_crops_are_seeded_per_image_and_epoch_and_leave_the_global_rng_alone(project):
    decode.main()
    images = TrainImages(DecodedSplit(decoded.TRAIN_SOURCE), train_transform(64, "bicubic", 0.3, True, 9), seed=3)
    loader = torch.utils.data.DataLoader(images, batch_size=len(images))
    source, positions, repeats = next(iter(loader))
    assert source.shape == (len(images), 3, 74, 74) and positions.tolist() == list(range(len(images)))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = images.augment(source, positions, repeats)
    assert torch.equal(torch.get_rng_state(), state)  # MixUp's draws do not depend on augmenting
    assert first.shape == (len(images), 3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, images.augment(source, positions, repeats))
    # one image at a time (as on several ranks) or in a batch: the same crops
    assert torch.equal(first[5], images.augment(source[5:6], positions[5:6], repeats[5:6])[0])
    again = images.augment(source, positions, repeats + 1)  # a second draw in the epoch: new crops
    assert not any(torch.equal(a, b) for a, b in zip(first, again))
    images.epoch = 1
    assert not any(torch.equal(a, b) for a, b in zip(first, images.augment(source, positions, repeats)))


def test_batches_cross_shards_and_ranks_share_them_out_once(project):
    decode.main()
    train = DecodedSplit("train")
    whole, ids = train.rows(0, len(train))
    for size in (1, 7, 10, 64):
        batches = list(train.batches(size))
        assert len(batches) == len(train.batches(size)) == len(train.batch_lengths(size))
        assert [len(b) for b, _ in batches] == train.batch_lengths(size)
        assert torch.equal(torch.cat([b for b, _ in batches]), whole)
        # rank r of 3 takes batches r, r+3, ...: together exactly the batches of one process
        dealt = {k: b for r in range(3) for k, (b, _) in zip(range(r, 10**6, 3), train.batches(size, r, 3))}
        assert all(torch.equal(dealt[k], batches[k][0]) for k in range(len(batches)))
    assert torch.equal(train.ids(), ids)


def test_stats_over_shards_equal_float64_over_the_decoded_images(project):
    decode.main()
    train = DecodedSplit("train")
    moments = ChannelMoments()
    for batch, _ in train.batches(5):
        moments.update(batch)
    x = train.rows(0, len(train))[0].double() / 255
    torch.testing.assert_close(moments.mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.std, x.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False),
                               rtol=1e-12, atol=0)


def test_decode_is_byte_identical_run_to_run(project):
    decode.main()
    first = {p.name: p.read_bytes() for p in sorted(decoded.DECODED.iterdir())}
    decode.main()
    assert {p.name: p.read_bytes() for p in sorted(decoded.DECODED.iterdir())} == first


def test_shards_of_another_manifest_are_refused(project):
    decode.main()
    manifest = project / "data" / "prepared" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",train,", ",val,", 1))
    with pytest.raises(TlpipeError, match="decoded from another manifest.*rerun the decode stage"):
        DecodedSplit("train")


def test_shards_without_the_training_source_name_the_stage_to_run(project):
    decode.main()
    meta_file = decoded.DECODED / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["splits"][decoded.TRAIN_SOURCE]  # as an older tlpipe wrote it
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(TlpipeError, match=r"meta.json: has no 'train_source' images; rerun the decode stage"):
        DecodedSplit(decoded.TRAIN_SOURCE)


def test_missing_shards_name_the_stage_to_run(project):
    with pytest.raises(TlpipeError, match=r"data/decoded/meta.json: missing; run the decode stage"):
        DecodedSplit("test")


@pytest.mark.parametrize("quality", [0, 95])
def test_an_empty_split_reads_as_no_images(tmp_path, quality):
    writer = decoded.ShardWriter(tmp_path, "test", (3, 8, 8), quality)
    writer.flush()
    meta = {"preprocessing": {"img_size": 8}, "splits": {"test": {"images": 0, "shards": writer.sizes}},
            "files": writer.files, "codec": decoded.codec(quality)}
    test = DecodedSplit("test", tmp_path, meta=meta)
    assert len(test) == 0 and list(test.batches(4)) == [] and test.ids().numel() == 0
    pixels, ids = test.rows(0, 0)
    assert pixels.shape == (0, 3, 8, 8) and ids.shape == (0,)
