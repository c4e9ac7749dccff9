"""The deterministic preference stream of training, each worker reading only its own share of the shards.

    epoch order   files in a seeded order, each cut into windows of ``shuffle_window`` rows, rows shuffled
                  inside a window: positions ``0 .. total-1`` of the epoch (metadata decides, no row is read)
    slots         the first ``G · L`` positions (G = global batch, L = steps per epoch = total // G) are cut
                  into G contiguous slots of L positions; slot ``j`` holds positions ``[j·L, (j+1)·L)``
    steps         step ``s`` takes position ``j·L + s`` of every slot ``j``: G rows from G far-apart places
    workers       worker ``r`` of N owns the G/N consecutive slots ``[r·G/N, (r+1)·G/N)``, i.e. one contiguous
                  1/N of the epoch order, so it opens only the shards of its own share (bytes read ≈ 1/N);
                  its micro-batches are its slots in order, ``micro`` at a time

so the global batch of a step is the same set of rows whatever the worker / accumulation split (G is fixed), a
resumed run restarts every slot at offset ``step`` without replaying anything, and a worker holds one window
per slot it owns (``micro · accum`` windows) in memory. ``ReadCounter`` counts the bytes actually read from the
shard files (what the benchmarks report per worker).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.core.io import shard_files
from hscr_platform.training.pref_data import COLUMNS, PrefDataConfig

# --- layout and epoch order ---------------------------------------------------------------------------------


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


# --- reading ------------------------------------------------------------------------------------------------


class ReadCounter:
    """Bytes read from shard files, and how many times a file was opened."""

    def __init__(self) -> None:
        self.bytes = 0
        self.opens = 0


class _CountingFile(io.FileIO):
    """A read-only file that adds every byte pyarrow reads from it to a :class:`ReadCounter`."""

    def __init__(self, path: str, counter: ReadCounter):
        super().__init__(path, "rb")
        self.counter = counter
        counter.opens += 1

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.counter.bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer) or 0
        self.counter.bytes += n
        return n


def _read_windows(path: str, bounds: list[tuple[int, int]], first: int, last: int, counter: ReadCounter | None
                  ) -> Iterator[pa.Table]:  # fmt: skip
    """Windows ``bounds[first:last + 1]`` of a file as pyarrow tables, reading only the row groups that hold
    them (the rows of the first group before them are read and dropped)."""
    with _CountingFile(path, counter or ReadCounter()) as source, pq.ParquetFile(source) as parquet:
        meta = parquet.metadata
        group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        begin, end = bounds[first][0], bounds[last][1]
        groups = range(int(np.searchsorted(group_starts, begin, side="right")) - 1,
                       int(np.searchsorted(group_starts, end, side="left")))  # fmt: skip
        batches = parquet.iter_batches(batch_size=bounds[0][1] - bounds[0][0], columns=COLUMNS,
                                       row_groups=list(groups))  # fmt: skip
        pending: pa.Table | None = None

        def filled(n: int) -> pa.Table:  # ``pending`` holding at least n rows
            nonlocal pending
            while pending is None or pending.num_rows < n:
                more = pa.Table.from_batches([next(batches)])
                pending = more if pending is None else pa.concat_tables([pending, more])
            return pending

        skip = begin - int(group_starts[groups[0]])  # the first group's rows before the first window
        pending = filled(skip).slice(skip)
        for start, stop in bounds[first : last + 1]:
            yield filled(stop - start).slice(0, stop - start)
            pending = filled(stop - start).slice(stop - start)


def iter_positions(layout: Layout, cfg: PrefDataConfig, *, epoch: int, seed: int, start: int, stop: int,
                   counter: ReadCounter | None = None) -> Iterator[tuple[int, dict[str, Any]]]:  # fmt: skip
    """(position, row) for ``start <= position < stop`` in position order, opening only the files that
    hold those positions and holding one window at a time."""
    pos = 0
    for f in file_order(layout, epoch=epoch, seed=seed, shuffle=cfg.shuffle):
        n_file = layout.rows[f]
        if pos + n_file <= start or pos >= stop:  # never opened
            pos += n_file
            continue
        bounds = _windows(n_file, cfg.shuffle_window)
        first = next(k for k, (_, hi) in enumerate(bounds) if pos + hi > start)
        last = max(k for k, (lo, _) in enumerate(bounds) if pos + lo < stop)
        pos += bounds[first][0]
        for (lo, hi), table in zip(bounds[first : last + 1], _read_windows(layout.files[f], bounds, first, last,
                                                                            counter), strict=True):  # fmt: skip
            n = hi - lo
            order = _rng(seed, epoch, f, lo).permutation(n) if cfg.shuffle else np.arange(n)
            wanted = [i for i in range(n) if start <= pos + i < stop]
            yield from zip((pos + i for i in wanted), table.take(order[wanted]).to_pylist(), strict=True)
            pos += n
            if pos >= stop:
                return


# --- slots and workers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slicing:
    """Which slots a worker owns: ``slots_per_worker`` consecutive ones, read ``micro`` at a time."""

    rank: int
    world: int
    micro: int

    def slots(self, global_batch: int) -> range:
        if global_batch % (self.world * self.micro):
            raise ValueError(f"global batch {global_batch} is not a multiple of world {self.world} × micro "
                             f"{self.micro}")  # fmt: skip
        per_worker = global_batch // self.world
        return range(self.rank * per_worker, (self.rank + 1) * per_worker)


def slot_range(slot: int, *, steps_per_epoch: int) -> tuple[int, int]:
    """Epoch positions ``[start, stop)`` of a slot."""
    return slot * steps_per_epoch, (slot + 1) * steps_per_epoch


def step_positions(step: int, *, global_batch: int, steps_per_epoch: int) -> list[int]:
    """The epoch positions of step ``step`` (within its epoch), slot by slot: what every split agrees on."""
    return [slot * steps_per_epoch + step for slot in range(global_batch)]


def iter_micro_batches(
    layout: Layout,
    cfg: PrefDataConfig,
    part: Slicing,
    *,
    seed: int,
    start_step: int,
    steps_per_epoch: int,
    global_batch: int,
    counter: ReadCounter | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """This worker's micro-batches (``micro`` raw rows each) from ``start_step`` on, epoch after epoch."""
    slots = part.slots(global_batch)
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        streams = []
        for slot in slots:
            lo, hi = slot_range(slot, steps_per_epoch=steps_per_epoch)
            streams.append(iter_positions(layout, cfg, epoch=epoch, seed=seed, start=lo + offset, stop=hi,
                                          counter=counter))  # fmt: skip
        for _ in range(offset, steps_per_epoch):
            rows = [next(stream)[1] for stream in streams]  # one row per owned slot, slot order
            for k in range(0, len(rows), part.micro):
                yield rows[k : k + part.micro]
        epoch, offset = epoch + 1, 0
