"""Parquet datasets as folders of shards: streaming writes with bounded memory, and reads.

A dataset folder holds ``part-00000.parquet, part-00001.parquet, ...``. Writers buffer at most
``rows_per_shard`` rows, so a dataset of any size is written in constant memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class ShardWriter:
    """Appends rows to ``<folder>/part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows each.

    Use as a context manager; ``close()`` flushes the last partial shard. ``start_index`` lets a resumed job
    add shards after the ones already there without overwriting them.
    """

    def __init__(self, folder: str | Path, schema: pa.Schema, *, rows_per_shard: int = 2048, start_index: int = 0,
                 row_group_size: int | None = None):  # fmt: skip
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self.next_index = start_index
        self.rows_written = 0
        self._buffer: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        final = self.folder / f"part-{self.next_index:05d}.parquet"
        tmp = final.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, row_group_size=self.row_group_size)
        tmp.replace(final)  # atomic: a killed job never leaves a half-written shard under the final name
        self.next_index += 1
        self.rows_written += len(self._buffer)
        self._buffer = []

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_files(folder: str | Path) -> list[Path]:
    """The finished shards of a dataset folder, in order (temporary files of a killed writer excluded)."""
    return sorted(Path(folder).glob("part-*.parquet"))


def next_shard_index(folder: str | Path) -> int:
    files = shard_files(folder)
    return int(files[-1].stem.split("-")[1]) + 1 if files else 0


def read_table(folder: str | Path, *, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset as one table (for small data and tests; pipelines stream shards instead)."""
    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"no parquet shards (part-*.parquet) in {folder}")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def iter_rows(folder: str | Path, *, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[dict]:
    """Stream rows as dicts, one record batch at a time."""
    for file in shard_files(folder):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def count_rows(folder: str | Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(folder))
