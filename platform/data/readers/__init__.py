"""Readers: each source format -> raw rows in the common schema (docs/DATA.md), or rejects.

Every reader is ``read_<format>(path, *, image_dir=None, split=None, ...) -> Iterator[RawRow | Reject]``.
It checks that its files exist when called (FileNotFoundError naming the path) and parses whole-file JSON
then; rows are produced lazily. One bad row becomes a ``Reject``, never an exception; a source that cannot be
read at all raises ``SourceError`` (a ValueError). Images are not checked here: ``samples.validate_sample``
does that (a row's image may still be a path to a file not read yet).

    rows = read_source(SourceConfig(format="slake", path="data/slake"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from hscr_platform.data.readers._common import SourceError
from hscr_platform.data.readers.llava_med import read_llava_med
from hscr_platform.data.readers.pathvqa import read_pathvqa
from hscr_platform.data.readers.slake import read_slake
from hscr_platform.data.readers.tabular import ColumnMap, read_jsonl, read_parquet
from hscr_platform.data.readers.vqa_rad import read_vqa_rad, read_vqa_rad_mevf
from hscr_platform.data.samples import RawRow, Reject

__all__ = ["READERS", "ColumnMap", "SourceConfig", "SourceError", "read_source"]

Format = Literal["vqa_rad", "vqa_rad_mevf", "slake", "pathvqa", "llava_med", "parquet", "jsonl"]
SPLITS: Final = ("train", "validation", "test")
TABULAR: Final = ("parquet", "jsonl")

READERS: dict[str, Callable[..., Iterator[RawRow | Reject]]] = {
    "vqa_rad": read_vqa_rad,
    "vqa_rad_mevf": read_vqa_rad_mevf,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "llava_med": read_llava_med,
    "parquet": read_parquet,
    "jsonl": read_jsonl,
}


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """What to read: a format, where its files are, and (for parquet/jsonl) how its columns map."""

    format: Format
    path: str  # the dataset folder or file (see docs/DATA.md for each format's layout)
    split: str | None = None  # overrides the split the data says (None: from the data / file name, else train)
    image_dir: str | None = None  # where image files are (None: the format's usual place)
    name: str | None = None  # parquet/jsonl only: the `source` column (None: the format name)
    columns: ColumnMap = dataclasses.field(default_factory=ColumnMap)  # parquet/jsonl only

    def __post_init__(self) -> None:
        if self.format not in get_args(Format):
            raise ValueError(f"format must be one of {list(get_args(Format))}, got {self.format!r}")
        if not self.path.strip():
            raise ValueError("path must not be empty")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or null, got {self.split!r}")
        if self.format not in TABULAR and (self.name is not None or self.columns != ColumnMap()):
            raise ValueError(f"name and columns apply to formats {list(TABULAR)} only, not {self.format!r}")
        if self.name is not None and not self.name.strip():
            raise ValueError("name must not be empty")


def read_source(cfg: SourceConfig) -> Iterator[RawRow | Reject]:
    """The rows of the source ``cfg`` describes (FileNotFoundError at once if its files are missing)."""
    kwargs: dict[str, Any] = {"image_dir": cfg.image_dir, "split": cfg.split}
    if cfg.format in TABULAR:
        kwargs |= {"columns": cfg.columns, "name": cfg.name or cfg.format}
    return READERS[cfg.format](cfg.path, **kwargs)
