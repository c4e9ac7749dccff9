"""Checking one sample before it is written: required fields, text, id uniqueness, and a safe image decode.

Shared by the ingest job and the preference-generation pipeline. A bad row never raises: ``validate_sample``
returns a ``Reject`` (a stable reason code + a human-readable detail) and the caller writes it to the rejects
table; every good row still comes through.

    seen: set[str] = set()
    reject = validate_sample(row, max_image_pixels=50_000_000, max_image_bytes=32 << 20, seen_ids=seen)
    image = decode_image(row["image"], max_pixels=50_000_000)   # a PIL image, fully decoded

Images are decoded defensively: the pixel count is read from the header and checked *before* the pixel data
is decoded (a 50,000 x 50,000 PNG of a few bytes never allocates 7 GB); truncated and corrupt files and PIL's
decompression-bomb guard become ``ImageError`` with a reason code. Truncation detection relies on PIL's
default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; a program that flips that global accepts padded images.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from PIL import Image

from hscr_platform.data.schema import reject_row

# Stable reject reason codes (written to the rejects table; documented in docs/DATA.md).
MISSING_FIELD: Final = "missing_field"  # a required field is absent or null
BAD_VALUE: Final = "bad_value"  # a field has an unusable type (e.g. a list where text is expected)
BAD_JSON: Final = "bad_json"  # a line / record that is not valid JSON or not a JSON object
EMPTY_QUESTION: Final = "empty_question"
EMPTY_ANSWER: Final = "empty_answer"
MISSING_IMAGE: Final = "missing_image"  # no image given, or the image file does not exist
EMPTY_IMAGE: Final = "empty_image"  # zero bytes
UNREADABLE_IMAGE: Final = "unreadable_image"  # not an image PIL can decode, or the file cannot be read
TRUNCATED_IMAGE: Final = "truncated_image"  # the header is fine but the pixel data ends early
IMAGE_TOO_LARGE: Final = "image_too_large"  # over max_image_bytes, or over max_image_pixels by its header
DUPLICATE_ID: Final = "duplicate_id"  # an id already written in this dataset
IMAGE_OUTSIDE_ROOT: Final = "image_outside_root"  # the image path resolves outside the dataset root

REJECT_REASONS: Final = (
    MISSING_FIELD,
    BAD_VALUE,
    BAD_JSON,
    EMPTY_QUESTION,
    EMPTY_ANSWER,
    MISSING_IMAGE,
    EMPTY_IMAGE,
    UNREADABLE_IMAGE,
    TRUNCATED_IMAGE,
    IMAGE_TOO_LARGE,
    DUPLICATE_ID,
    IMAGE_OUTSIDE_ROOT,
)

# Columns a sample cannot be written without (the non-nullable text columns of SAMPLE_SCHEMA).
REQUIRED_TEXT: Final = ("id", "source", "split", "question", "answer", "answer_type")

# A row in the common schema before validation: every SAMPLE_SCHEMA column (see schema.sample_row); its
# "image" is encoded bytes, a pathlib.Path to a file not read yet, or None when the source gave no image.
RawRow = dict[str, Any]


@dataclass(frozen=True)
class Reject:
    """Why a row was not written: one row of the rejects table (REJECT_SCHEMA)."""

    id: str
    source: str
    reason: str  # one of REJECT_REASONS
    detail: str = ""

    def as_row(self) -> dict[str, str]:
        return reject_row(id=self.id, source=self.source, reason=self.reason, detail=self.detail)


class ImageError(ValueError):
    """An image cannot be used; ``reason`` is a reject reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def validate_sample(row: RawRow, *, max_image_pixels: int, max_image_bytes: int, seen_ids: set[str]) -> Reject | None:
    """None if ``row`` can be written, else the ``Reject`` (reason + detail) that says why not.

    Checks, in order: required fields present, question/answer non-blank text, id not in ``seen_ids``, then
    the image (present, within ``max_image_bytes``, decodes fully within ``max_image_pixels``). On success the
    id is added to ``seen_ids`` and an image given as a ``Path`` is replaced in ``row`` by its bytes, so the
    row is ready to write. Ids of rejected rows are not recorded: a later good row with that id is accepted.
    """
    row_id, source = str(row.get("id") or "<no id>"), str(row.get("source") or "")
    reason, detail = _check_text(row)
    if reason is None and row_id in seen_ids:
        reason, detail = DUPLICATE_ID, f"id {row_id!r} was already written"
    if reason is None:
        try:
            row["image"] = _check_image(row.get("image"), max_pixels=max_image_pixels, max_bytes=max_image_bytes)
        except ImageError as exc:
            reason, detail = exc.reason, exc.detail
    if reason is not None:
        return Reject(id=row_id, source=source, reason=reason, detail=detail)
    seen_ids.add(row_id)
    return None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes into a fully loaded PIL image, or raise ``ImageError`` with a reason code.

    The header is parsed first and ``width * height > max_pixels`` is refused before any pixel data is
    decoded. Empty bytes -> empty_image; too many pixels (ours or PIL's DecompressionBombError) ->
    image_too_large; data ending early -> truncated_image; anything else PIL cannot decode ->
    unreadable_image.
    The image keeps its own mode (call ``.convert("RGB")`` where a model needs it).
    """
    if not data:
        raise ImageError(EMPTY_IMAGE, "the image has 0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels is the limit; PIL's global warning threshold would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(IMAGE_TOO_LARGE, f"{width}x{height} pixels > max_image_pixels={max_pixels}")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:  # image plugins raise many types; one bad file must not stop a job
        reason = TRUNCATED_IMAGE if _is_truncation(exc) else UNREADABLE_IMAGE
        raise ImageError(reason, f"{type(exc).__name__}: {exc}") from None
    return image


def read_image_file(path: Path, *, max_bytes: int) -> bytes:
    """The bytes of an image file; its size is checked from the file system before it is read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(MISSING_IMAGE, f"no image file {path}") from None
    except OSError as exc:
        raise ImageError(UNREADABLE_IMAGE, f"cannot stat {path}: {exc}") from None
    if not path.is_file():
        raise ImageError(MISSING_IMAGE, f"{path} is not a file")
    if size > max_bytes:
        raise ImageError(IMAGE_TOO_LARGE, f"{path} has {size} bytes > max_image_bytes={max_bytes}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(UNREADABLE_IMAGE, f"cannot read {path}: {exc}") from None


# --- internals -----------------------------------------------------------------------------------


def _check_text(row: RawRow) -> tuple[str | None, str]:
    for name in REQUIRED_TEXT:
        value = row.get(name)
        if value is None:
            return MISSING_FIELD, f"no {name}"
        if not isinstance(value, str):
            return BAD_VALUE, f"{name} must be text, got {type(value).__name__}"
    if not row["question"].strip():
        return EMPTY_QUESTION, "the question is empty"
    if not row["answer"].strip():
        return EMPTY_ANSWER, "the answer is empty"
    return None, ""


def _check_image(image: Any, *, max_pixels: int, max_bytes: int) -> bytes:
    if image is None:
        raise ImageError(MISSING_IMAGE, "no image given")
    if isinstance(image, Path):
        image = read_image_file(image, max_bytes=max_bytes)
    if not isinstance(image, bytes | bytearray | memoryview):
        raise ImageError(UNREADABLE_IMAGE, f"image must be bytes or a file path, got {type(image).__name__}")
    data = bytes(image)
    if len(data) > max_bytes:
        raise ImageError(IMAGE_TOO_LARGE, f"{len(data)} bytes > max_image_bytes={max_bytes}")
    decode_image(data, max_pixels=max_pixels).close()
    return data


def _is_truncation(exc: Exception) -> bool:
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()
