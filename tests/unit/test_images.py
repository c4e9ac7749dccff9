"""High-bit-depth images to 8-bit (hscr_platform.data.images), and open_image, which every engine uses."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hscr_platform.data.images import Window, min_max_window, open_rgb, png_8bit, to_8bit, window_to_uint8
from hscr_platform.models.loading import open_image


def ramp16(height: int = 16) -> np.ndarray:
    """A full 0..65535 ramp, 256 columns: (height, 256) uint16."""
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (height, 1))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def grey(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    pixels = np.asarray(image)  # (H, W, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def test_a_16_bit_ramp_keeps_its_256_grey_levels_and_is_not_white():
    data = encode(Image.fromarray(ramp16()))
    assert Image.open(io.BytesIO(data)).mode.startswith("I"), "a 16-bit PNG, as DICOM exports write"
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 0]
    assert clipped.mean() > 250, "PIL's own convert clips it white (the bug this fixes)"
    for opened in (open_image(data), open_rgb(data)):
        values = grey(opened)
        assert len(np.unique(values)) == 256
        assert values.mean() == pytest.approx(127.5, abs=0.01)
        assert values.min() == 0 and values.max() == 255
        assert (np.diff(values[0].astype(int)) == 1).all(), "monotone: one grey level per ramp step"


def test_window_maps_linearly_and_clips_outside():
    values = np.array([[0, 1000, 1500, 2000, 3000]], dtype=np.uint16)
    # window [1000, 2000]: 1000 -> 0, 1500 -> 127.5 -> 128 (rint: half to even gives 128), 2000 -> 255
    assert window_to_uint8(values, Window(1000, 2000)).tolist() == [[0, 0, 128, 255, 255]]
    assert Window.from_centre_width(40, 400) == Window(-160, 240)  # a CT soft-tissue window
    with pytest.raises(ValueError, match="low <= high"):
        Window(10, 5)


def test_a_stated_window_is_used_instead_of_min_max():
    image = Image.fromarray(ramp16())
    windowed = np.asarray(to_8bit(image, Window(0, 65535 / 2)))  # (16, 256)
    assert windowed[0, :128].max() < 255 and (windowed[0, 129:] == 255).all()
    assert windowed[0, 64] == round(255 * (ramp16()[0, 64] / (65535 / 2)))


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", np.array([[256, 512, 768]], dtype=">u2"), [[0, 128, 255]]),
        ("I", np.array([[-1000, 0, 1000]], dtype=np.int32), [[0, 128, 255]]),
        ("F", np.array([[0.0, 0.25, 1.0]], dtype=np.float32), [[0, 64, 255]]),
    ],
)
def test_other_high_bit_depth_modes_are_windowed(mode, values, expected):
    image = Image.fromarray(values) if mode != "I;16B" else Image.frombytes(mode, (3, 1), values.tobytes())
    assert image.mode == mode
    out = to_8bit(image)
    assert out.mode == "L" and np.asarray(out).tolist() == expected


def test_constant_and_nan_images_do_not_divide_by_zero():
    assert np.asarray(to_8bit(Image.fromarray(np.full((2, 2), 4000, dtype=np.uint16)))).tolist() == [[0, 0], [0, 0]]
    values = np.array([[np.nan, 0.0, 2.0]], dtype=np.float32)
    assert min_max_window(values) == Window(0.0, 2.0)
    assert np.asarray(to_8bit(Image.fromarray(values))).tolist() == [[0, 0, 255]]


def test_8_bit_images_are_left_as_they_are():
    rgb = Image.new("RGB", (4, 4), (200, 30, 30))
    assert to_8bit(rgb) is rgb
    assert np.asarray(open_image(encode(rgb))).tolist() == np.asarray(rgb).tolist()
    assert png_8bit(encode(rgb)) is None and png_8bit(encode(rgb.convert("L"))) is None


def test_png_8bit_reencodes_and_says_what_it_did():
    converted = png_8bit(encode(Image.fromarray(ramp16())))
    assert converted is not None
    data, done = converted
    assert done["window"] == [0.0, 65535.0] and str(done["mode"]).startswith("I")
    image = Image.open(io.BytesIO(data))
    assert image.mode == "L" and len(np.unique(np.asarray(image))) == 256
