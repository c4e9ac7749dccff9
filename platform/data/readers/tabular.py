"""Generic readers: parquet files and JSON Lines, with a column mapping onto the common schema.

``path`` is one file or a folder (all ``*.parquet`` / ``*.jsonl`` / ``*.ndjson`` below it, sorted). The image
column may hold encoded bytes, a Hugging Face ``Image`` struct ``{"bytes", "path"}`` (bytes preferred, else
the path), or a file path; relative paths are resolved against ``image_dir`` (default: the data file's
folder). A path (relative or absolute) that resolves outside ``image_dir`` (default: the folder given, or the
single file's folder) is rejected as image_outside_root; image bytes need no check. JSON Lines can only carry
paths. Parquet is streamed in small record batches (constant memory).

Ids: the ``columns.id`` column's value as text, or positional ``<name>:<file stem>:<row>`` (parquet: row
index from 0; JSONL: line number). Split: ``split`` argument > ``columns.split`` column > file name > train.
``meta``: the record's other fields as JSON (image bytes left out, an image path kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.data.readers._common import (
    DEFAULT_SPLIT,
    SourceError,
    bad_json,
    confine_image,
    dataset_root,
    files_in,
    iter_json_lines,
    make_row,
    meta_json,
    missing_field,
    normalise_split,
    require_path,
    split_from_name,
)
from hscr_platform.data.samples import BAD_VALUE, RawRow, Reject

_BATCH_ROWS: Final = 64  # rows per parquet record batch: images make rows large


@dataclass(frozen=True, kw_only=True)
class ColumnMap:
    """Which source column fills each sample column (``source.columns.*``); None = not in the source."""

    question: str = "question"
    answer: str = "answer"
    image: str = "image"  # bytes, {"bytes", "path"} struct, or a file path
    id: str | None = None  # None: positional ids
    split: str | None = None
    answer_type: str | None = None  # closed/open/report (any case); absent: yes/no answers closed, else open
    question_type: str | None = None
    modality: str | None = None
    organ: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not value.strip():
                raise ValueError(f"columns.{field.name} must be a column name, got {value!r}")

    def used(self) -> list[str]:
        """The source columns this mapping reads."""
        return [v for v in dataclasses.astuple(self) if v is not None]


def read_parquet(
    path: str | Path,
    *,
    columns: ColumnMap = ColumnMap(),  # frozen, so a shared default is safe
    name: str = "parquet",
    image_dir: str | Path | None = None,
    split: str | None = None,
) -> Iterator[RawRow | Reject]:
    """Rows of parquet file(s); every mapped column must exist in every file (else SourceError)."""
    given = require_path(path, "parquet file or folder")
    files = files_in(given, (".parquet",), "parquet")
    images = require_path(image_dir, "image folder") if image_dir is not None else None
    for file in files:
        _check_columns(file, _open_parquet(file).schema_arrow.names, columns)
    where = _Where(columns=columns, name=name, images=images, root=images or dataset_root(given), split=split)
    return _parquet_rows(files, where)


def read_jsonl(
    path: str | Path,
    *,
    columns: ColumnMap = ColumnMap(),  # frozen, so a shared default is safe
    name: str = "jsonl",
    image_dir: str | Path | None = None,
    split: str | None = None,
) -> Iterator[RawRow | Reject]:
    """Rows of JSON Lines file(s); a line that is not a JSON object is rejected as bad_json."""
    given = require_path(path, "JSON Lines file or folder")
    files = files_in(given, (".jsonl", ".ndjson"), "JSON Lines")
    images = require_path(image_dir, "image folder") if image_dir is not None else None
    where = _Where(columns=columns, name=name, images=images, root=images or dataset_root(given), split=split)
    return _jsonl_rows(files, where)


@dataclass(frozen=True, kw_only=True)
class _Where:
    """What every row of one read shares: the column map, the source name, the image folder and root, the split."""

    columns: ColumnMap
    name: str
    images: Path | None  # relative image paths are joined onto this (None: the data file's folder)
    root: Path  # no image outside it
    split: str | None


def _open_parquet(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read parquet file {file}: {exc}") from None


def _check_columns(file: Path, names: list[str], columns: ColumnMap) -> None:
    absent = [c for c in columns.used() if c not in names]
    if absent:
        raise SourceError(f"{file}: no column(s) {absent} (see source.columns); its columns are {names}")


def _parquet_rows(files: list[Path], where: _Where) -> Iterator[RawRow | Reject]:
    for file in files:
        index = 0
        try:
            for batch in _open_parquet(file).iter_batches(batch_size=_BATCH_ROWS):
                for record in batch.to_pylist():
                    yield _row(record, where, file=file, position=index)
                    index += 1
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read parquet file {file} after {index} rows: {exc}") from None


def _jsonl_rows(files: list[Path], where: _Where) -> Iterator[RawRow | Reject]:
    name = where.name
    for file in files:
        for number, record, error in iter_json_lines(file):
            line_id = f"{name}:{file.stem}:{number}"
            if error:
                yield bad_json(id=line_id, source=name, detail=f"{file.name} line {number}: {error}")
            elif not isinstance(record, dict):
                detail = f"{file.name} line {number} is a {type(record).__name__}, not an object"
                yield bad_json(id=line_id, source=name, detail=detail)
            else:
                yield _row(record, where, file=file, position=number)


def _row(record: dict[str, Any], at: _Where, *, file: Path, position: int) -> RawRow | Reject:
    columns, name = at.columns, at.name
    raw_id = _get(record, columns.id)
    row_id = f"{name}:{file.stem}:{position}" if raw_id is None else str(raw_id)
    where = f"{file.name} row {position}"
    absent = [c for c in (columns.question, columns.answer, columns.image) if c not in record]
    if columns.id is not None and raw_id is None:
        absent.insert(0, columns.id)
    if absent:
        return missing_field(id=row_id, source=name, keys=absent, where=where)
    image = _image_of(record[columns.image], folder=at.images or file.parent)
    if isinstance(image, str):
        return Reject(id=row_id, source=name, reason=BAD_VALUE, detail=f"{where}: {image}")
    if isinstance(image, Path):
        image = confine_image(image, at.root, id=row_id, source=name, where=where)
        if isinstance(image, Reject):
            return image
    row_split = at.split or _get_split(record, columns) or split_from_name(file.name) or DEFAULT_SPLIT
    return make_row(
        id=row_id,
        source=name,
        split=row_split,
        image=image,
        question=record[columns.question],
        answer=record[columns.answer],
        answer_type=_get(record, columns.answer_type),
        question_type=_get(record, columns.question_type),
        modality=_get(record, columns.modality),
        organ=_get(record, columns.organ),
        meta=meta_json(_meta_record(record, columns.image)),
    )


def _image_of(value: Any, *, folder: Path) -> bytes | Path | str | None:
    """The image as bytes or a path, None when absent, or an error text for an unusable value."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return Path(value) if Path(value).is_absolute() else folder / value
    return f"the image is a {type(value).__name__}, not bytes or a path"


def _meta_record(record: dict[str, Any], image_column: str) -> dict[str, Any]:
    kept = dict(record)
    image = kept.pop(image_column, None)
    path = image.get("path") if isinstance(image, dict) else image
    if isinstance(path, str):
        kept[image_column] = path  # provenance: where the image came from
    return kept


def _get(record: dict[str, Any], column: str | None) -> Any:
    return record.get(column) if column is not None else None


def _get_split(record: dict[str, Any], columns: ColumnMap) -> str | None:
    return normalise_split(_get(record, columns.split))
