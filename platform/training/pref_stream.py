"""The deterministic preference stream of training.

    epoch order   files in a seeded order, each cut into windows of ``shuffle_window`` rows, rows shuffled
                  inside a window (memory is bounded by one window, never by the dataset)
    positions     row ``p`` of an epoch belongs to micro-round ``p // micro`` and to worker
                  ``(p // micro) % world``; step ``s`` covers positions ``[s·G, (s+1)·G)`` (G = global batch)

so a resumed run restarts at exactly ``step · G`` without replaying anything, and the global batch of a step does
not depend on how it is split over workers and accumulation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.core.io import shard_files
from hscr_platform.training.pref_data import COLUMNS, PrefDataConfig

# --- the stream -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The shard files and how many rows of each are used (metadata only: no row is read)."""

    files: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.rows)


def dataset_layout(folder: str | Path, *, max_rows: int | None = None) -> Layout:
    """Row counts per shard from the parquet footers, cut at ``max_rows``."""
    files, rows, left = [], [], max_rows if max_rows is not None else float("inf")
    for path in shard_files(folder):
        take = int(min(pq.ParquetFile(path).metadata.num_rows, left))
        if take > 0:
            files.append(str(path))
            rows.append(take)
        left -= take
    if not files:
        raise FileNotFoundError(f"data.path: no preference shards (part-*.parquet) in {folder}")
    return Layout(tuple(files), tuple(rows))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(k) for k in key])


def file_order(layout: Layout, *, epoch: int, seed: int, shuffle: bool) -> list[int]:
    n = len(layout.files)
    return _rng(seed, epoch).permutation(n).tolist() if shuffle else list(range(n))


def _windows(num_rows: int, window: int) -> list[tuple[int, int]]:
    return [(start, min(start + window, num_rows)) for start in range(0, num_rows, window)]


def _read_windows(path: str, bounds: list[tuple[int, int]], columns: list[str]) -> Iterator[pa.Table]:
    """Consecutive row ranges of a file as pyarrow tables (whatever the file's row groups are)."""
    batches = pq.ParquetFile(path).iter_batches(batch_size=bounds[0][1] - bounds[0][0], columns=columns)
    pending: pa.Table | None = None
    for start, stop in bounds:
        while pending is None or pending.num_rows < stop - start:
            more = pa.Table.from_batches([next(batches)])
            pending = more if pending is None else pa.concat_tables([pending, more])
        yield pending.slice(0, stop - start)
        pending = pending.slice(stop - start)


@dataclass(frozen=True)
class Slicing:
    """Which positions a worker reads: micro-round ``p // micro`` goes to worker ``round % world``."""

    rank: int
    world: int
    micro: int

    def owns(self, pos: int) -> bool:
        return (pos // self.micro) % self.world == self.rank


def iter_worker_rows(
    layout: Layout, cfg: PrefDataConfig, part: Slicing, *, epoch: int, seed: int, start: int, stop: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, row) of this worker's rows with ``start <= position < stop``, in position order."""
    pos = 0
    for f in file_order(layout, epoch=epoch, seed=seed, shuffle=cfg.shuffle):
        bounds = _windows(layout.rows[f], cfg.shuffle_window)
        if pos + layout.rows[f] <= start or pos >= stop:  # skipped without reading the file
            pos += layout.rows[f]
            continue
        for (lo, hi), table in zip(bounds, _read_windows(layout.files[f], bounds, COLUMNS), strict=False):
            n = hi - lo
            order = _rng(seed, epoch, f, lo).permutation(n) if cfg.shuffle else np.arange(n)
            mine = [i for i in range(n) if start <= pos + i < stop and part.owns(pos + i)]
            rows = table.take(order[mine]).to_pylist() if mine else []
            yield from zip((pos + i for i in mine), rows, strict=True)
            pos += n
            if pos >= stop:
                return


def iter_micro_batches(
    layout: Layout,
    cfg: PrefDataConfig,
    part: Slicing,
    *,
    seed: int,
    start_step: int,
    steps_per_epoch: int,
    global_batch: int,
) -> Iterator[list[dict[str, Any]]]:
    """This worker's micro-batches (``micro`` raw rows each) from ``start_step`` on, epoch after epoch."""
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        rows = iter_worker_rows(layout, cfg, part, epoch=epoch, seed=seed, start=offset * global_batch,
                                stop=steps_per_epoch * global_batch)  # fmt: skip
        while chunk := [row for _, row in itertools.islice(rows, part.micro)]:
            yield chunk
        epoch, offset = epoch + 1, 0
