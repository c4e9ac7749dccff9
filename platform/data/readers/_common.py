"""Helpers every reader shares: locating files, reading JSON leniently, confining image paths, building a raw row.

Image paths: a reader opens no file outside the dataset root it was given. Every image path a record names is
resolved (symlinks followed, ``..`` collapsed; an absolute path stays absolute) and a row whose image lands
outside the root is rejected as ``image_outside_root`` (``confine_image``), before anything reads the file.

Text policy: files are decoded as UTF-8 with ``errors="replace"``, so an invalid byte becomes U+FFFD instead
of failing the whole file, and U+FFFD characters already in the data (VQA-RAD qid 2136) are kept as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from hscr_platform.data.samples import BAD_JSON, BAD_VALUE, IMAGE_OUTSIDE_ROOT, MISSING_FIELD, RawRow, Reject
from hscr_platform.data.schema import sample_row

DEFAULT_SPLIT: Final = "train"  # when neither the config nor the data says
# Reject reason (docs/DATA.md "Reject reasons"): the record's image path resolves outside the dataset root
_SPLIT_ALIASES: Final = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_SPLIT_IN_NAME: Final = re.compile(r"(?:^|[^a-z])(" + "|".join(_SPLIT_ALIASES) + r")(?:set)?(?:$|[^a-z])")
_CLOSED_ANSWERS: Final = frozenset({"yes", "no"})


class SourceError(ValueError):
    """The source itself cannot be read (not one bad row): the job stops with this message (exit 2)."""


def require_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it and what was expected there."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def files_in(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """``path`` itself if it is a file, else its files with one of ``suffixes`` (recursively, sorted)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files for {what} under {path}")
    return files


def dataset_root(path: Path) -> Path:
    """The folder a reader was given: ``path`` itself, or the folder of a single data file."""
    return path if path.is_dir() else path.parent


def confine_image(image: Path, root: Path, *, id: str, source: str, where: str) -> Path | Reject:
    """``image`` resolved (symlinks followed), if that lies inside ``root`` (resolved too); else a Reject.

    ``image`` is the record's path already joined onto its folder (``folder / name``: an absolute name
    replaces the folder). A missing file inside the root is returned as is (validation rejects it later as
    missing_image); a path that cannot be resolved at all (a NUL byte, a symlink loop) is bad_value.
    """
    try:
        resolved, inside = image.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        return Reject(id=id, source=source, reason=BAD_VALUE, detail=f"{where}: image path {str(image)!r}: {exc}")
    if resolved.is_relative_to(inside):
        return resolved
    detail = f"{where}: image {str(image)!r} resolves to {resolved}, outside the dataset root {inside}"
    return Reject(id=id, source=source, reason=IMAGE_OUTSIDE_ROOT, detail=detail)


def load_json(path: Path) -> Any:
    """A whole JSON file (UTF-8, invalid bytes -> U+FFFD); a file that is not JSON is a SourceError."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from None


def load_json_list(path: Path) -> list[Any]:
    data = load_json(path)
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed value or None, error text) for each non-blank line of a JSON Lines file."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
                if not line:
                    continue
                try:
                    yield number, json.loads(line), ""
                except json.JSONDecodeError as exc:
                    yield number, None, str(exc)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None


def split_from_name(name: str) -> str | None:
    """'trainset.json' -> 'train', 'validate.json' -> 'validation', 'test-00000.parquet' -> 'test'."""
    match = _SPLIT_IN_NAME.search(Path(name).name.lower())
    return _SPLIT_ALIASES[match.group(1)] if match else None


def normalise_split(value: Any) -> str | None:
    """A split value from the data: known aliases mapped (val -> validation), others kept lower-cased."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip().lower()
    return _SPLIT_ALIASES.get(text, text)


def answer_type_of(raw: Any, answer: Any) -> str:
    """The dataset's answer type ("CLOSED", "CLOSED ", "open" ...) lower-cased; when absent or unknown,
    yes/no answers are closed and everything else open."""
    text = str(raw).strip().lower() if raw is not None else ""
    if text in ("closed", "open", "report"):
        return text
    is_yes_no = isinstance(answer, str) and answer.strip().lower().rstrip(".") in _CLOSED_ANSWERS
    return "closed" if is_yes_no else "open"


def lower_or_none(value: Any) -> str | None:
    """A category value (question type, modality, organ) stripped and lower-cased; blank -> None."""
    if value is None or not str(value).strip():
        return None
    return str(value).strip().lower()


def modality_of(value: Any) -> str | None:
    """'X-Ray' -> 'xray', 'CT' -> 'ct', 'MRI' -> 'mri' (the schema's spelling); blank -> None."""
    text = lower_or_none(value)
    return re.sub(r"[\s_-]+", "", text) if text else None


def missing(record: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if record.get(key) is None]


def bad_json(*, id: str, source: str, detail: str) -> Reject:
    return Reject(id=id, source=source, reason=BAD_JSON, detail=detail)


def missing_field(*, id: str, source: str, keys: list[str], where: str) -> Reject:
    return Reject(id=id, source=source, reason=MISSING_FIELD, detail=f"{where}: no {', '.join(keys)}")


def meta_json(record: Mapping[str, Any], *, drop: tuple[str, ...] = ()) -> str:
    """The source record as a JSON object (non-ASCII kept raw, bytes left out), minus the ``drop`` keys."""
    kept = {k: v for k, v in record.items() if k not in drop and not isinstance(v, bytes | bytearray)}
    return json.dumps(kept, ensure_ascii=False, default=str)


def make_row(
    *,
    id: str,
    source: str,
    split: str,
    image: bytes | Path | None,
    question: Any,
    answer: Any,
    answer_type: Any = None,
    question_type: Any = None,
    modality: Any = None,
    organ: Any = None,
    meta: str | None = None,
) -> RawRow | Reject:
    """A raw row in the common schema; question/answer coerced to text (an int answer 4 -> "4").

    A null question/answer stays None (validate_sample rejects it as missing_field); a list or object where
    text is expected is rejected here as bad_value.
    """
    texts: dict[str, str | None] = {}
    for name, value in (("question", question), ("answer", answer)):
        if value is not None and not isinstance(value, str | int | float):
            return Reject(id=id, source=source, reason=BAD_VALUE, detail=f"{name} is a {type(value).__name__}")
        texts[name] = None if value is None else str(value)
    return sample_row(
        id=id,
        source=source,
        split=split,
        image=image,
        question=texts["question"],
        answer=texts["answer"],
        answer_type=answer_type_of(answer_type, texts["answer"]),
        question_type=lower_or_none(question_type),
        modality=modality_of(modality),
        organ=lower_or_none(organ),
        meta=meta,
    )
