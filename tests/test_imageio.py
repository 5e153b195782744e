"""Images: every Pillow mode, EXIF rotation, corrupt/truncated/huge/tiny files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bicm import BicmError, BicmWarning
from bicm.imageio import load_image, to_rgb


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "mode, name",
    [("L", "gray.png"), ("1", "bw.png"), ("P", "pal.png"), ("RGBA", "rgba.png"), ("LA", "la.png"), ("CMYK", "cmyk.jpg"), ("RGB", "rgb.webp")],
)
def test_modes_become_rgb(tmp_path, mode, name):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    out = load_image(save(tmp_path, image, name))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparency_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (0, 0, 10, 20))
    out = np.asarray(load_image(save(tmp_path, image, "a.png")))
    assert tuple(out[5, 2]) == (0, 0, 255)
    assert tuple(out[5, 15]) == (255, 255, 255)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(palette))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 16).reshape(16, 64)).astype(np.uint16)
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(ramp), "deep.png")))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert 100 < out[8, 32, 0] < 155  # mid-grey stays mid-grey
    for mode in ("I", "F"):
        wide = Image.fromarray(ramp.astype(np.int32 if mode == "I" else np.float32))
        arr = np.asarray(to_rgb(wide))
        assert arr.max() == 255 and arr.min() == 0


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, image, "rot.jpg", exif=exif.tobytes(), quality=95)
    shown = load_image(path)
    assert shown.size == (20, 60)
    assert np.asarray(shown)[2, 10].mean() > 200  # the stripe is now at the top
    raw = load_image(path, exif_transpose=False)
    assert raw.size == (60, 20)


def test_missing_directory_and_non_image(tmp_path):
    with pytest.raises(BicmError, match="image not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(BicmError, match="not a regular file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    with pytest.raises(BicmError, match="not an image file"):
        load_image(text)


def test_truncated_and_corrupt_files(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BicmError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (100, 100), (10, 20, 30)).save(jpeg, "JPEG")
    broken = bytearray(jpeg.getvalue())
    broken[200:600] = b"\xff" * 400
    (tmp_path / "broken.jpg").write_bytes(bytes(broken[:700]))
    with pytest.raises(BicmError):
        load_image(tmp_path / "broken.jpg")


def test_decompression_bomb_guard(tmp_path):
    path = save(tmp_path, Image.new("RGB", (200, 100)), "big.png")
    with pytest.raises(BicmError, match="more than the limit of 10,000"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=None).size == (200, 100)


def test_tiny_image_warns_but_loads(tmp_path):
    path = save(tmp_path, Image.new("RGB", (3, 2), (1, 2, 3)), "tiny.png")
    with pytest.warns(BicmWarning, match="only 3x2 pixels"):
        assert load_image(path).size == (3, 2)
