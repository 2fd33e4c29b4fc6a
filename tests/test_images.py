"""Unit tests for tlpipe.ingest.images: the decode check, RGB conversion and the evaluation geometry."""


import numpy as np
import pytest
import torch
from PIL import Image

from tlpipe.ingest.images import check_image, eval_transform, load_rgb, to_rgb


def noisy_rgb(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("ext, fmt", [(".jpg", "JPEG"), (".png", "PNG"), (".gif", "GIF"),
                                      (".bmp", "BMP"), (".webp", "WEBP")])
def test_check_image_accepts_good_files(tmp_path, ext, fmt):
    path = tmp_path / f"good{ext}"
    noisy_rgb().save(path, fmt)
    assert check_image(path) is None
    assert check_image(str(path)) is None
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)


def test_check_image_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    reason = check_image(path)
    assert isinstance(reason, str) and "0 bytes" in reason


def test_check_image_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    reason = check_image(path)
    assert isinstance(reason, str) and "not an image" in reason


def test_check_image_truncated_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    noisy_rgb((128, 96)).save(good, "JPEG", quality=95)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert check_image(good) is None
    reason = check_image(cut)
    assert isinstance(reason, str) and reason.startswith("cannot decode")


def test_check_image_truncated_png(tmp_path):
    good = tmp_path / "good.png"
    noisy_rgb((128, 96)).save(good, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-len(good.read_bytes()) // 3])
    assert isinstance(check_image(cut), str)


def pixel(img: Image.Image, xy) -> tuple:
    return tuple(int(v) for v in img.getpixel(xy))


def test_to_rgb_rgba_transparent_pixel_becomes_white(tmp_path):
    img = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))        # fully transparent black
    img.putpixel((2, 0), (0, 0, 0, 128))      # half-transparent black: grey
    img.save(tmp_path / "a.png")
    for source in (img, Image.open(tmp_path / "a.png")):
        rgb = to_rgb(source)
        assert rgb.mode == "RGB"
        assert pixel(rgb, (0, 0)) == (10, 20, 30)
        assert pixel(rgb, (1, 0)) == (255, 255, 255)
        assert all(abs(v - 127) <= 1 for v in pixel(rgb, (2, 0)))


def test_to_rgb_la_transparent_pixel_becomes_white():
    img = Image.new("LA", (2, 1), (40, 255))
    img.putpixel((1, 0), (0, 0))
    rgb = to_rgb(img)
    assert pixel(rgb, (0, 0)) == (40, 40, 40)
    assert pixel(rgb, (1, 0)) == (255, 255, 255)


def test_to_rgb_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (3 * 254))  # index 0 black, 1 blue
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    with Image.open(path) as loaded:
        assert loaded.mode == "P" and "transparency" in loaded.info
        rgb = to_rgb(loaded)
    assert pixel(rgb, (0, 0)) == (255, 255, 255)
    assert pixel(rgb, (1, 0)) == (0, 0, 255)
    assert check_image(path) is None


@pytest.mark.parametrize("mode, opaque, key", [("L", 200, 0), ("RGB", (0, 0, 255), (0, 0, 0))])
def test_to_rgb_trns_colour_key_becomes_white(tmp_path, mode, opaque, key):
    img = Image.new(mode, (2, 1), key)
    img.putpixel((1, 0), opaque)
    path = tmp_path / "t.png"
    img.save(path, transparency=key)
    with Image.open(path) as loaded:
        assert loaded.mode == mode and "transparency" in loaded.info
        rgb = to_rgb(loaded)
    assert pixel(rgb, (0, 0)) == (255, 255, 255)


def test_to_rgb_16_bit_grayscale_png_scales_to_8_bit(tmp_path):
    arr = np.array([[0, 65535, 32768], [257, 1000, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as loaded:
        assert loaded.mode == "I;16"
        rgb = np.asarray(to_rgb(loaded))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] == 0
    assert rgb[0, 1, 0] == 255 and rgb[1, 2, 0] == 255
    assert rgb[0, 2, 0] == 128
    assert rgb[1, 0, 0] == 1
    assert rgb[1, 1, 0] == 4  # 1000 / 65535 * 255 = 3.89
    assert check_image(path) is None


def test_to_rgb_grayscale_gives_equal_channels():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.asarray(to_rgb(Image.fromarray(arr, "L")))
    assert rgb.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], arr)


def test_to_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    with Image.open(path) as loaded:
        assert loaded.size == (40, 20)
        rgb = to_rgb(loaded)
    assert rgb.size == (20, 40)
    # after a clockwise turn, the left band is at the top
    r, g, b = pixel(rgb, (10, 2))
    assert b > 200 and r < 60
    r, g, b = pixel(rgb, (10, 37))
    assert r > 200 and b < 60
    assert load_rgb(path).size == (20, 40)


def test_to_rgb_without_orientation_keeps_size():
    assert to_rgb(Image.new("RGB", (40, 20))).size == (40, 20)


@pytest.mark.parametrize("size", [(80, 50), (50, 80), (36, 36), (20, 13)])
def test_eval_transform_gives_uint8_chw_at_img_size(size):
    transform = eval_transform(img_size=32, resize_size=36, interpolation="bicubic")
    out = transform(noisy_rgb(size))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (3, 32, 32)


def test_eval_transform_is_resize_then_centre_crop():
    # left half red, right half blue, 72x36 -> resize short side to 36 (no-op) -> crop centre 32
    arr = np.zeros((36, 72, 3), dtype=np.uint8)
    arr[:, :36, 0] = 255
    arr[:, 36:, 2] = 255
    out = eval_transform(32, 36, "bilinear")(Image.fromarray(arr))
    assert tuple(out.shape) == (3, 32, 32)
    assert (out[0, :, :15] == 255).all() and (out[2, :, :15] == 0).all()
    assert (out[2, :, 17:] == 255).all() and (out[0, :, 17:] == 0).all()


# --------------------------------------------------------------------------- messy inputs

def test_cmyk_jpeg_converts_to_the_right_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red ink
    with Image.open(path) as loaded:
        assert loaded.mode == "CMYK"
    assert check_image(path) is None
    r, g, b = pixel(load_rgb(path), (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16_bit_mode_i_pgm_scales_by_16_bit_range_not_clipped(tmp_path):
    # A 16-bit PGM opens as mode I (32-bit int); PIL's convert("L") would clip it all to white.
    path = tmp_path / "g16.pgm"
    values = np.array([0, 65535, 32768, 1000], dtype=">u2")
    path.write_bytes(b"P5\n4 1\n65535\n" + values.tobytes())
    with Image.open(path) as loaded:
        assert loaded.mode == "I"
        rgb = np.asarray(to_rgb(loaded))
    assert rgb[0, :, 0].tolist() == [0, 255, 128, 4]
    assert check_image(path) is None


def test_mode_i_tiff_with_8_bit_values_is_unchanged(tmp_path):
    path = tmp_path / "i8.tif"
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)).save(path)
    with Image.open(path) as loaded:
        assert loaded.mode == "I"
        assert np.asarray(to_rgb(loaded))[0, :, 1].tolist() == [0, 100, 255]


def test_mode_i_beyond_16_bit_scales_by_its_maximum():
    img = Image.fromarray(np.array([[0, 100_000, 200_000]], dtype=np.int32))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiff_in_unit_range_scales_to_8_bit(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)).save(path)
    with Image.open(path) as loaded:
        assert loaded.mode == "F"
        assert np.asarray(to_rgb(loaded))[0, :, 2].tolist() == [0, 128, 255, 0]
    assert check_image(path) is None


def test_one_by_one_image_is_usable_and_resized_to_the_input_geometry(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    assert check_image(path) is None
    out = eval_transform(32, 36, "bicubic")(load_rgb(path))
    assert tuple(out.shape) == (3, 32, 32)
    assert out[:, 16, 16].tolist() == [10, 200, 30]


def test_exif_rotated_jpeg_through_the_eval_transform_keeps_portrait_orientation(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    path = tmp_path / "rot8.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    rgb = load_rgb(path)
    assert rgb.size == (32, 64)
    # counter-clockwise: the left (blue) half ends at the bottom
    assert pixel(rgb, (16, 60))[2] > 200 and pixel(rgb, (16, 4))[0] > 200


@pytest.mark.parametrize("side, warns", [(40, True), (100, False)])
def test_decompression_bomb_is_refused_with_pixel_count(tmp_path, monkeypatch, side, warns):
    # 40x40 = 1600 pixels is between 1x and 2x the limit (PIL only warns), 100x100 beyond 2x (error):
    # both are refused.
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    reason = check_image(path)
    assert reason == f"{side * side} pixels, more than PIL's limit of 1000 (a decompression bomb?)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    assert check_image(path) is None


def test_missing_file_and_broken_symlink(tmp_path):
    assert check_image(tmp_path / "absent.png") == "file not found"
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert check_image(tmp_path / "dangling.png") == "file not found (broken symlink)"


def test_symlink_pointing_outside_the_root_is_refused_unread(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    Image.new("RGB", (4, 4)).save(root / "inside.png")
    (root / "link.png").symlink_to(outside)
    (root / "ok_link.png").symlink_to(root / "inside.png")
    (root / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    reason = check_image(root / "link.png", root)
    assert reason == f"symlink to {outside.resolve()}, outside the data root {root}"
    assert check_image(root / "linked_dir" / "secret.png", root).startswith("symlink to")
    assert check_image(root / "ok_link.png", root) is None
    assert check_image(root / "link.png") is None  # without a root, nothing to escape from


def test_directory_named_like_an_image_is_a_one_line_reason(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    reason = check_image(tmp_path / "folder.jpg")
    assert reason == "not a regular file (a folder)"  # named for what it is, never opened (issue 30)
