"""PathVQA reader for the Hugging Face parquet release (``flaviagiammarino/path-vqa``).

Layout: ``<path>/data/{train,validation,test}-NNNNN-of-NNNNN.parquet`` (or any folder / single file of them),
columns ``image`` (struct ``{"bytes", "path"}``), ``question``, ``answer``. The release has no answer type:
yes/no answers are closed, all others open (PathVQA's own convention). No question type, modality or organ.
Split from the file name. Ids: ``pathvqa:<file stem>:<row>``. This is the generic parquet reader with a fixed
column mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

from hscr_platform.data.readers.tabular import ColumnMap, read_parquet
from hscr_platform.data.samples import RawRow, Reject

SOURCE: Final = "pathvqa"
COLUMNS: Final = ColumnMap(question="question", answer="answer", image="image")


def read_pathvqa(
    path: str | Path, *, image_dir: str | Path | None = None, split: str | None = None
) -> Iterator[RawRow | Reject]:
    """Rows of the PathVQA parquet release; ``path`` is a parquet file or a folder of them."""
    return read_parquet(path, columns=COLUMNS, name=SOURCE, image_dir=image_dir, split=split)
