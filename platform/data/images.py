"""High-bit-depth images to 8-bit, in one place: ingest and every engine (``models.loading.open_image``) use it.

Scans exported from DICOM are often 16-bit grayscale PNGs (PIL mode ``I;16``), or 32-bit integer (``I``) and
float (``F``) images. PIL's ``convert("L")`` / ``convert("RGB")`` does not rescale them: it clips every value
above 255, so a full 0..65535 scan comes out almost white. Here such an image is *windowed* instead: the
values in ``[low, high]`` map linearly onto 0..255 and the rest clip,

    out = round(255 * clip((x - low) / (high - low), 0, 1))

with the window the source states (DICOM's window centre/width gives ``low = c - w/2``, ``high = c + w/2``)
or, when none is given, the image's own min..max. A constant image (low == high) becomes black. 8-bit images
(L, RGB, P, ...) are returned unchanged.

    image = to_8bit(Image.open(path))             # mode L for a 16-bit scan, unchanged otherwise
    rgb = to_rgb(Image.open(path))                # what a model's processor takes
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image

# PIL modes of single-channel images with more than 8 bits per pixel
HIGH_BIT_DEPTH_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


@dataclass(frozen=True)
class Window:
    """The value range shown as 0..255: ``low`` -> black, ``high`` -> white."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not np.isfinite([self.low, self.high]).all() or self.high < self.low:
            raise ValueError(f"a window needs finite low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def from_centre_width(cls, centre: float, width: float) -> Window:
        """DICOM's (window centre, window width) as [centre - width/2, centre + width/2]."""
        return cls(centre - width / 2, centre + width / 2)


def is_high_bit_depth(image: Image.Image) -> bool:
    return image.mode in HIGH_BIT_DEPTH_MODES


def min_max_window(values: np.ndarray) -> Window:
    """The window that spans the finite values of ``values`` (any shape); [0, 0] when there are none."""
    finite = values[np.isfinite(values)]
    return Window(float(finite.min()), float(finite.max())) if finite.size else Window(0.0, 0.0)


def window_to_uint8(values: np.ndarray, window: Window) -> np.ndarray:
    """``values`` (H, W) of any numeric dtype -> (H, W) uint8 by the linear window (NaN -> 0)."""
    x = values.astype(np.float64)  # (H, W)
    span = window.high - window.low
    scaled = (x - window.low) / span if span > 0 else np.zeros_like(x)  # (H, W), 0..1 inside the window
    scaled = np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)
    return np.rint(scaled * 255.0).astype(np.uint8)  # (H, W)


def to_8bit(image: Image.Image, window: Window | None = None) -> Image.Image:
    """A high-bit-depth image windowed to 8-bit grayscale (mode L); any other image returned as it is.

    ``window`` is the range the source states; None = the image's own min..max.
    """
    if not is_high_bit_depth(image):
        return image
    values = np.asarray(image)  # (H, W): uint16 / int32 / float32 by mode
    return Image.fromarray(window_to_uint8(values, window or min_max_window(values)))  # (H, W) uint8 -> L


def to_rgb(image: Image.Image, window: Window | None = None) -> Image.Image:
    """The image as 8-bit RGB, high-bit-depth ones windowed first (see ``to_8bit``)."""
    return to_8bit(image, window).convert("RGB")


def open_rgb(data: bytes, window: Window | None = None) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB image, windowed if high-bit-depth."""
    return to_rgb(Image.open(io.BytesIO(data)), window)


def png_8bit(data: bytes, window: Window | None = None) -> tuple[bytes, dict[str, object]] | None:
    """A high-bit-depth image re-encoded as an 8-bit grayscale PNG, with what was done; None if already 8-bit.

    The second item records the source mode and the window used, e.g. ``{"mode": "I;16", "window": [0, 65535]}``.
    Only the header is read for an 8-bit image (no pixel decode).
    """
    image = Image.open(io.BytesIO(data))
    if not is_high_bit_depth(image):
        return None
    values = np.asarray(image)
    used = window or min_max_window(values)
    buffer = io.BytesIO()
    Image.fromarray(window_to_uint8(values, used)).save(buffer, "PNG")  # mode L
    return buffer.getvalue(), {"mode": image.mode, "window": [used.low, used.high]}
