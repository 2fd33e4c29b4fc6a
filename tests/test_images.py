"""Unit tests for tlpipe.images: the decode check, RGB conversion and the evaluation geometry."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlpipe.images import check_image, eval_transform, load_rgb, to_rgb


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
