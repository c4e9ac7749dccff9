"""Generation's input plan: chunks of one shard each, repeated ids marked, the seen ids kept on disk."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.generation.job import GenDataConfig
from hscr_platform.generation.plan import IdSet, plan_chunks


def _shard(folder: Path, name: str, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "question": ["q"] * len(ids)}), folder / name)


def test_repeated_ids_are_marked_within_and_across_shards_at_their_later_offsets(tmp_path):
    _shard(tmp_path, "part-00000.parquet", ["a", "b", "a", "c", "d"])
    _shard(tmp_path, "part-00001.parquet", ["e", "c", "f"])
    plan = plan_chunks(GenDataConfig(input=str(tmp_path), chunk_rows=2))
    assert plan.rows == 8
    got = [(Path(c.file).name[-9:-8], c.start, c.stop, c.first_row, c.duplicates) for c in plan.chunks]
    # shard 0: "a" again at offset 2 (chunk [2,4), inside offset 0); shard 1: "c" again at offset 1
    assert got == [("0", 0, 2, 0, ()), ("0", 2, 4, 2, (0,)), ("0", 4, 5, 4, ()),
                   ("1", 0, 2, 5, (1,)), ("1", 2, 3, 7, ())]  # fmt: skip
    assert [c.index for c in plan.chunks] == [0, 1, 2, 3, 4]


def test_the_id_set_finds_repeats_in_one_list_and_never_counts_missing_ids():
    with IdSet() as seen:
        assert seen.add_all([b"x", b"y", b"x", None, None]) == [2]
        assert seen.add_all([b"y", b"z", b"z"]) == [0, 2]


def test_the_id_set_does_not_hold_the_ids_in_python_memory():
    """100k ids of 40 bytes: a Python set would hold ~10 MiB; the on-disk set's Python allocations stay small."""
    ids = [f"row-{i:036d}".encode() for i in range(100_000)]
    with IdSet() as seen:
        tracemalloc.start()
        for start in range(0, len(ids), 4096):
            assert seen.add_all(ids[start : start + 4096]) == []
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 3 * 2**20
