"""VQA-RAD readers: the official OSF release and the MEVF ``data_RAD`` variant (same fields, new qids).

OSF layout (https://osf.io/89kps/)::

    <path>/VQA_RAD Dataset Public.json     a JSON array, one object per QA (14 keys)
    <path>/VQA_RAD Image Folder/<image_name>

MEVF layout (``data_RAD`` of MICCAI19-MedVQA)::

    <path>/trainset.json, <path>/testset.json, <path>/images/<image_name>

Mapping: ``question``/``answer`` verbatim (int answers -> "4"), ``answer_type`` CLOSED/"CLOSED "/OPEN ->
closed/open, ``question_type`` lower-cased as given (typos such as "ATRIB" kept), ``image_organ`` ->
organ (ABD -> abdomen), modality unknown (null). The whole record is kept in ``meta`` ("NULL" strings, the
original int answer and type string included). Split: OSF ``phrase_type`` test_* -> test, others -> train;
MEVF from the file name (trainset -> train). An ``image_name`` that resolves outside the image folder
(``../x.png``, an absolute path elsewhere, a symlink out) is rejected as image_outside_root.
Ids: ``vqa_rad:<qid>`` (OSF), ``vqa_rad_mevf:<file>:<qid>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

SOURCE: Final = "vqa_rad"
OSF_JSON: Final = "VQA_RAD Dataset Public.json"
OSF_IMAGES: Final = "VQA_RAD Image Folder"
MEVF_FILES: Final = ("trainset.json", "testset.json")
MEVF_IMAGES: Final = "images"
_REQUIRED: Final = ("qid", "question", "answer", "image_name")
_ORGANS: Final = {"ABD": "abdomen", "CHEST": "chest", "HEAD": "head"}


def read_vqa_rad(
    path: str | Path, *, image_dir: str | Path | None = None, split: str | None = None
) -> Iterator[RawRow | Reject]:
    """Rows of the OSF release; ``path`` is its folder or the JSON file. ``split`` overrides phrase_type."""
    root = require_path(path, "VQA-RAD (OSF) folder or JSON file")
    json_file = root if root.is_file() else require_path(root / OSF_JSON, "VQA-RAD (OSF) JSON file")
    images = require_path(image_dir or json_file.parent / OSF_IMAGES, "VQA-RAD image folder")
    records = load_json_list(json_file)  # parsed now: a broken file fails before any output is written

    def split_of(record: dict[str, Any]) -> str:
        return split or ("test" if str(record.get("phrase_type", "")).startswith("test") else DEFAULT_SPLIT)

    return _rows(records, json_file=json_file, images=images, id_prefix=SOURCE, split_of=split_of)


def read_vqa_rad_mevf(
    path: str | Path, *, image_dir: str | Path | None = None, split: str | None = None
) -> Iterator[RawRow | Reject]:
    """Rows of the MEVF variant; ``path`` is the folder with trainset.json/testset.json, or one of them.

    The images live in ``<path>/images`` unless ``image_dir`` says otherwise.
    """
    root = require_path(path, "VQA-RAD (MEVF) folder or JSON file")
    files = [root] if root.is_file() else [root / name for name in MEVF_FILES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"VQA-RAD (MEVF): no {' or '.join(MEVF_FILES)} in {root}")
    images = require_path(
        image_dir or files[0].parent / MEVF_IMAGES, "VQA-RAD (MEVF) image folder (set source.image_dir)"
    )
    loaded = [(file, load_json_list(file)) for file in files]
    return _mevf_rows(loaded, images=images, split=split)


def _mevf_rows(loaded: list[tuple[Path, list[Any]]], *, images: Path, split: str | None) -> Iterator[RawRow | Reject]:
    for file, records in loaded:
        file_split = split or split_from_name(file.name) or DEFAULT_SPLIT

        def split_of(_record: dict[str, Any], file_split: str = file_split) -> str:
            return file_split

        id_prefix = f"vqa_rad_mevf:{file.stem}"
        yield from _rows(records, json_file=file, images=images, id_prefix=id_prefix, split_of=split_of)


def _rows(
    records: list[Any],
    *,
    json_file: Path,
    images: Path,
    id_prefix: str,
    split_of: Callable[[dict[str, Any]], str],
) -> Iterator[RawRow | Reject]:
    for index, record in enumerate(records):
        where = f"{json_file.name} record {index}"
        if not isinstance(record, dict):
            detail = f"{where} is a {type(record).__name__}, not an object"
            yield bad_json(id=f"{json_file.name}:row:{index}", source=SOURCE, detail=detail)
            continue
        qid = record.get("qid")
        row_id = f"{id_prefix}:{qid}" if qid is not None else f"{json_file.name}:row:{index}"
        absent = missing(record, _REQUIRED)
        if absent:
            yield missing_field(id=row_id, source=SOURCE, keys=absent, where=where)
            continue
        image = confine_image(images / str(record["image_name"]), images, id=row_id, source=SOURCE, where=where)
        if isinstance(image, Reject):
            yield image
            continue
        organ = record.get("image_organ")
        yield make_row(
            id=row_id,
            source=SOURCE,
            split=split_of(record),
            image=image,
            question=record["question"],
            answer=record["answer"],
            answer_type=record.get("answer_type"),
            question_type=record.get("question_type"),
            organ=_ORGANS.get(str(organ).strip().upper(), organ),
            meta=meta_json(record),
        )
