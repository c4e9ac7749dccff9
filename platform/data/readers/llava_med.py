"""LLaVA-Med instruction data reader (``llava_med_instruct_*.json``, LLaVA conversation format).

Layout: ``<path>`` is a ``.json`` file (an array of records) or ``.jsonl`` file (one record per line), or a
folder of them; images are resolved against ``image_dir`` (default: the data file's folder) and must stay
inside ``image_dir`` (default: the folder given, or the single file's folder), else the record is rejected
(image_outside_root, one reject for the record). A record::

    {"id": "...", "image": "PMC-123_fig1.jpg", "domain": {"ct_scan": true, ...},
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "..."}]}

Each human turn and the gpt turn after it become one row (a multi-turn record gives several rows, all with
the record's image). The ``<image>`` placeholder is removed from the question and the question stripped; the
answer is verbatim. Answer type: yes/no answers closed, others open. Modality from ``domain`` when exactly one
flag is true (chest_xray -> xray, ct_scan -> ct, mri, histology, gross). ``meta``: the record without its
conversations, plus ``turn``. Split: the ``split`` argument, else the file name, else train.
Ids: ``llava_med:<id>:<turn>`` (a record without ``id``: ``llava_med:<file stem>:<index>:<turn>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from hscr_platform.data.readers._common import (
    DEFAULT_SPLIT,
    bad_json,
    confine_image,
    dataset_root,
    files_in,
    iter_json_lines,
    load_json_list,
    make_row,
    meta_json,
    missing,
    missing_field,
    require_path,
    split_from_name,
)
from hscr_platform.data.samples import RawRow, Reject

SOURCE: Final = "llava_med"
IMAGE_TOKEN: Final = "<image>"
_DOMAINS: Final = {
    "chest_xray": "xray",
    "ct_scan": "ct",
    "mri": "mri",
    "histology": "histology",
    "gross": "gross",
}


def read_llava_med(
    path: str | Path, *, image_dir: str | Path | None = None, split: str | None = None
) -> Iterator[RawRow | Reject]:
    """Rows of LLaVA-Med instruction file(s); a JSON array file is parsed before the first row is yielded."""
    given = require_path(path, "LLaVA-Med JSON file or folder")
    files = files_in(given, (".json", ".jsonl"), "LLaVA-Med")
    images = require_path(image_dir, "LLaVA-Med image folder") if image_dir is not None else None
    loaded = [(file, None if file.suffix == ".jsonl" else load_json_list(file)) for file in files]
    return _rows(loaded, images=images, root=images or dataset_root(given), split=split)


def _rows(
    loaded: list[tuple[Path, list[Any] | None]], *, images: Path | None, root: Path, split: str | None
) -> Iterator[RawRow | Reject]:
    for file, records in loaded:
        file_split = split or split_from_name(file.name) or DEFAULT_SPLIT
        for index, record, error in _records(file, records):
            position = f"{SOURCE}:{file.stem}:{index}"
            if error or not isinstance(record, dict):
                detail = error or f"a {type(record).__name__}, not an object"
                yield bad_json(id=position, source=SOURCE, detail=f"{file.name} record {index}: {detail}")
                continue
            folder = images or file.parent
            yield from _record_rows(record, file=file, position=position, images=folder, root=root, split=file_split)


def _records(file: Path, records: list[Any] | None) -> Iterator[tuple[int, Any, str]]:
    """(index or line number, record, error) from a JSON array already loaded, or from JSON Lines."""
    if records is None:
        yield from iter_json_lines(file)
    else:
        yield from ((index, record, "") for index, record in enumerate(records))


def _record_rows(
    record: dict[str, Any], *, file: Path, position: str, images: Path, root: Path, split: str
) -> Iterator[RawRow | Reject]:
    base_id = f"{SOURCE}:{record['id']}" if record.get("id") is not None else position
    absent = missing(record, ("image", "conversations"))
    if absent:
        yield missing_field(id=base_id, source=SOURCE, keys=absent, where=file.name)
        return
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        yield bad_json(id=base_id, source=SOURCE, detail=f"{file.name}: conversations is not a list of turns")
        return
    pairs = list(_pairs(turns))
    if not pairs:
        yield missing_field(id=base_id, source=SOURCE, keys=["human turn"], where=f"{file.name} conversations")
        return
    image = confine_image(images / str(record["image"]), root, id=base_id, source=SOURCE, where=file.name)
    if isinstance(image, Reject):
        yield image
        return
    for turn, (question, answer) in enumerate(pairs):
        yield make_row(
            id=f"{base_id}:{turn}",
            source=SOURCE,
            split=split,
            image=image,
            question=question,
            answer=answer,
            modality=_modality(record.get("domain")),
            meta=meta_json({**record, "turn": turn}, drop=("conversations",)),
        )


def _pairs(turns: list[dict[str, Any]]) -> Iterator[tuple[Any, Any]]:
    """(question, answer) per human turn; the answer is the next turn if it is gpt's, else None."""
    for i, turn in enumerate(turns):
        if turn.get("from") != "human":
            continue
        question = turn.get("value")
        if isinstance(question, str):
            question = question.replace(IMAGE_TOKEN, "").strip()
        following = turns[i + 1] if i + 1 < len(turns) else {}
        yield question, following.get("value") if following.get("from") == "gpt" else None


def _modality(domain: Any) -> str | None:
    if not isinstance(domain, dict):
        return None
    flagged = [_DOMAINS.get(key, key) for key, value in domain.items() if value is True]
    return flagged[0] if len(flagged) == 1 else None
