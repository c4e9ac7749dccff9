"""SLAKE 1.0 reader, English part (https://www.med-vqa.com/slake/; Hugging Face ``BoKelvin/SLAKE``).

Layout::

    <path>/train.json, validation.json (or validate.json), test.json    JSON arrays of QA records
    <path>/img/xmlab<N>/source.jpg        (the original Slake1.0.zip calls the folder imgs/; both work)

``img_name`` ("xmlab102/source.jpg") is relative to the image folder; one that resolves outside it is rejected
as image_outside_root. Only records with ``q_lang == "en"`` are
read; Chinese records are skipped, not counted and not rejected. Mapping: question/answer verbatim,
``answer_type`` OPEN/CLOSED -> open/closed, ``content_type`` -> question_type (lower-cased), ``modality``
(CT/MRI/X-Ray -> ct/mri/xray), ``location`` -> organ (lower-cased); the whole record (img_id, base_type,
triple, ...) in ``meta``. Split from the file name. Ids: ``slake:<qid>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from hscr_platform.data.readers._common import (
    DEFAULT_SPLIT,
    bad_json,
    confine_image,
    load_json_list,
    make_row,
    meta_json,
    missing,
    missing_field,
    require_path,
    split_from_name,
)
from hscr_platform.data.samples import RawRow, Reject

SOURCE: Final = "slake"
FILES: Final = ("train.json", "validation.json", "validate.json", "test.json")
IMAGE_FOLDERS: Final = ("img", "imgs")
LANGUAGE: Final = "en"
_REQUIRED: Final = ("qid", "question", "answer", "img_name")


def read_slake(
    path: str | Path, *, image_dir: str | Path | None = None, split: str | None = None
) -> Iterator[RawRow | Reject]:
    """English rows of SLAKE; ``path`` is the release folder or one of its JSON files."""
    root = require_path(path, "SLAKE folder or JSON file")
    files = [root] if root.is_file() else [root / name for name in FILES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"SLAKE: none of {', '.join(FILES)} in {root}")
    images = require_path(image_dir or _default_images(files[0].parent), "SLAKE image folder")
    loaded = [(file, load_json_list(file)) for file in files]
    return _rows(loaded, images=images, split=split)


def _default_images(folder: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (folder / name).is_dir():
            return folder / name
    return folder / IMAGE_FOLDERS[0]  # does not exist: require_path names it


def _rows(loaded: list[tuple[Path, list[Any]]], *, images: Path, split: str | None) -> Iterator[RawRow | Reject]:
    for file, records in loaded:
        file_split = split or split_from_name(file.name) or DEFAULT_SPLIT
        for index, record in enumerate(records):
            where = f"{file.name} record {index}"
            if not isinstance(record, dict):
                detail = f"{where} is a {type(record).__name__}, not an object"
                yield bad_json(id=f"{file.name}:row:{index}", source=SOURCE, detail=detail)
                continue
            if record.get("q_lang", LANGUAGE) != LANGUAGE:
                continue
            qid = record.get("qid")
            row_id = f"{SOURCE}:{qid}" if qid is not None else f"{file.name}:row:{index}"
            absent = missing(record, _REQUIRED)
            if absent:
                yield missing_field(id=row_id, source=SOURCE, keys=absent, where=where)
                continue
            image = confine_image(images / str(record["img_name"]), images, id=row_id, source=SOURCE, where=where)
            if isinstance(image, Reject):
                yield image
                continue
            yield make_row(
                id=row_id,
                source=SOURCE,
                split=file_split,
                image=image,
                question=record["question"],
                answer=record["answer"],
                answer_type=record.get("answer_type"),
                question_type=record.get("content_type"),
                modality=record.get("modality"),
                organ=record.get("location"),
                meta=meta_json(record),
            )
