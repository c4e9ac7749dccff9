"""Generation's input plan: the input cut into chunks of one shard each (the unit of resume and of actor
work), with the offsets of repeated ids marked, and a fingerprint a resumed run must match.

The driver reads one shard's ids at a time and keeps the ids seen so far on disk (:class:`IdSet`), so planning
does not grow the driver's memory with the number of input rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.core.io import shard_files
from hscr_platform.generation.job import GenDataConfig


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of one input shard; ``duplicates``: offsets whose id appeared earlier."""

    index: int
    file: str
    start: int
    stop: int
    first_row: int  # global input position of ``start`` (positional ids: row:<n>)
    duplicates: tuple[int, ...]


@dataclass(frozen=True)
class ChunkPlan:
    chunks: list[Chunk]
    rows: int
    fingerprint: str  # shard names + sizes: a resumed run must see the same input


def _ids(path: Path) -> list[bytes | None]:
    """The raw id bytes of a shard (read as binary: invalid UTF-8 must not fail the plan)."""
    pf = pq.ParquetFile(path)
    if "id" not in pf.schema_arrow.names:
        return [None] * pf.metadata.num_rows
    return pf.read(columns=["id"]).column("id").cast(pa.binary()).to_pylist()


def plan_chunks(cfg: GenDataConfig) -> ChunkPlan:
    """Cut the input into chunks of at most ``chunk_rows`` rows of one shard; mark repeated ids."""
    files = shard_files(cfg.input)
    if not files:
        raise FileNotFoundError(f"data.input: no sample shards (part-*.parquet) in {cfg.input}")
    chunks: list[Chunk] = []
    total = 0
    digest = hashlib.sha256()
    with IdSet() as seen:
        for path in files:
            ids = _ids(path)
            if cfg.max_rows is not None:
                ids = ids[: max(0, cfg.max_rows - total)]
            digest.update(f"{path.name}:{path.stat().st_size}:{len(ids)};".encode())
            dup = seen.add_all(ids)
            chunks += _cut(path, ids, dup, cfg.chunk_rows, first_index=len(chunks), first_row=total)
            total += len(ids)
    return ChunkPlan(chunks, total, digest.hexdigest()[:16])


def _cut(path: Path, ids: list[Any], dup: list[int], chunk_rows: int, *, first_index: int,
         first_row: int) -> list[Chunk]:  # fmt: skip
    """One shard's chunks of at most ``chunk_rows`` rows, each with the offsets of its repeated ids."""
    chunks: list[Chunk] = []
    for start in range(0, len(ids), chunk_rows):
        stop = min(start + chunk_rows, len(ids))
        inside = tuple(o - start for o in dup if start <= o < stop)
        chunks.append(Chunk(first_index + len(chunks), str(path.resolve()), start, stop, first_row + start, inside))
    return chunks


class IdSet:
    """The ids seen so far, kept on disk (a temporary SQLite table) so the driver's memory does not grow with
    the number of input rows; ``add_all(ids)`` returns the offsets whose id was seen before (earlier in the
    same list included). ``None`` ids (an input with no id column) are never duplicates."""

    def __enter__(self) -> IdSet:
        import sqlite3
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="hscr-ids-")
        self._db = sqlite3.connect(Path(self._dir.name) / "ids.sqlite")
        self._db.execute("CREATE TABLE seen (id BLOB PRIMARY KEY) WITHOUT ROWID")
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()
        self._dir.cleanup()

    def add_all(self, ids: list[bytes | None]) -> list[int]:
        dup = []
        with self._db:  # one transaction per list
            for offset, rid in enumerate(ids):
                if rid is None:
                    continue
                if self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (rid,)).rowcount == 0:
                    dup.append(offset)
        return dup


def chunk_descriptor(chunk: Chunk) -> dict[str, Any]:
    return {**asdict(chunk), "duplicates": list(chunk.duplicates)}
