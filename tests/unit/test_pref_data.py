"""Preference rows: bad rows skipped with reasons, reference source, collation shapes, the streaming order."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from PIL import Image

from hscr_platform.training.pref_data import PrefDataConfig, Skip, SkipLog, as_matrix, collate, to_example
from hscr_platform.training.pref_stream import (
    ReadCounter,
    Slicing,
    dataset_layout,
    iter_micro_batches,
    iter_positions,
    step_positions,
)
from hscr_platform.training.toy_prefs import write_preference_shards

FP = "fingerprint-1"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), color=80).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int = 0, n: int = 3, **changes) -> dict:
    row = {
        "id": f"r{i}",
        "image": _png(),
        "question": "is there a nodule?",
        "responses": [f"a{j}" for j in range(n)],
        "response_token_ids": [[5 + j, 2] for j in range(n)],
        "num_levels": n - 1,
        "ref_logps": [-1.0 - j for j in range(n)],
        "ref_fingerprint": FP,
    }
    row.update(changes)
    return row


def _example(row: dict, *, max_levels: int = 4, use_stored: bool = True):
    return to_example(row, max_levels=max_levels, vocab_size=100, fingerprint=FP, use_stored=use_stored)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"responses": ["a"], "response_token_ids": [[5, 2]], "num_levels": 0}, "too_few_responses"),
        ({"responses": ["a", "b", "c"], "response_token_ids": [[5, 2], [6, 2]]}, "length_mismatch"),
        ({"num_levels": 5}, "length_mismatch"),
        ({"response_token_ids": [[5, 2], [], [7, 2]]}, "empty_response"),
        ({"response_token_ids": [[5, 2], [6, 2], [700, 2]]}, "bad_token_ids"),
        ({"image": None}, "missing_image"),
        ({"image": b"\x89PNG not really"}, "bad_image"),
        ({"question": "  "}, "empty_question"),
    ],
)
def test_bad_rows_are_skipped_with_a_reason(changes, reason):
    skip = _example(_row(**changes))
    assert isinstance(skip, Skip) and skip.reason == reason and skip.id == "r0"


def test_reference_source_follows_the_fingerprint():
    assert _example(_row()).ref_status == "stored" and _example(_row()).ref_logps == (-1.0, -2.0, -3.0)
    stale = _example(_row(ref_fingerprint="other"))
    assert stale.ref_logps is None and stale.ref_status == "stale"  # a stale row is kept, not skipped
    assert _example(_row(ref_logps=[-1.0])).ref_status == "missing"
    assert _example(_row(), use_stored=False).ref_status == "off"


def test_extra_levels_keep_the_best_ranked():
    ex = _example(_row(n=5), max_levels=3)
    assert ex.responses == ((5, 2), (6, 2), (7, 2)) and ex.ref_logps == (-1.0, -2.0, -3.0)


def test_skip_log_counts_every_reason_and_prints_a_few(capsys):
    log = SkipLog(prefix="[t]", limit=1)
    log.note(Skip("a", "bad_image"))
    log.note(Skip("b", "bad_image"))
    assert log.counts == {"bad_image": 2} and capsys.readouterr().out.count("skipped row") == 1


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from hscr_platform.models.loading import ModelConfig, load_vlm

    return load_vlm(ModelConfig(path=str(tiny_model_dir)))[1]


def test_collate_shapes_and_level_masks(processor):
    examples = [
        _example(_row(0, n=2)),
        _example(_row(1, n=4, ref_fingerprint="old", question="describe it.")),
    ]
    batch = collate(examples, processor, num_levels=4)
    assert batch.ids == ["r0", "r1"] and batch.num_valid == 2
    assert batch.prefix["input_ids"].shape[0] == 2 and batch.prefix["pixel_values"].shape[0] == 2
    assert len(batch.responses) == 6
    assert batch.owner.tolist() == [0, 0, 1, 1, 1, 1] and batch.level.tolist() == [0, 1, 0, 1, 2, 3]
    assert batch.level_mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert batch.needs_ref.tolist() == [False, True]
    assert batch.ref_logps[0, :2].tolist() == [-1.0, -2.0] and batch.ref_logps[1].isnan().all()
    flat = torch.arange(6, dtype=torch.float32)  # (R,)
    assert as_matrix(flat, batch, num_levels=4).tolist() == [[0, 1, 0, 0], [2, 3, 4, 5]]


def test_an_all_skipped_micro_batch_becomes_a_masked_filler(processor):
    batch = collate([], processor, num_levels=4)
    assert batch.ids == ["<filler>"] and batch.num_valid == 0 and not batch.level_mask.any()
    assert len(batch.responses) == 2 and not batch.needs_ref.any()


# --- the stream --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """23 rows in shards of 5 (the last one short) — windows of 3 cut across them."""
    folder = tmp_path_factory.mktemp("pref")
    return write_preference_shards([_row(i) for i in range(23)], folder, rows_per_shard=5)


def _ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def _epoch(shards, *, start=0, stop=23, epoch=0, shuffle=True, counter=None) -> list[tuple[int, str]]:
    cfg = PrefDataConfig(path=str(shards), shuffle_window=3, shuffle=shuffle)
    rows = iter_positions(dataset_layout(shards), cfg, epoch=epoch, seed=7, start=start, stop=stop, counter=counter)
    return [(p, r["id"]) for p, r in rows]


def _stream(shards, *, world=1, rank=0, micro=2, start_step=0, steps_per_epoch=2, global_batch=8, counter=None,
            window=3, seed=7):  # fmt: skip
    cfg = PrefDataConfig(path=str(shards), shuffle_window=window)
    return iter_micro_batches(dataset_layout(shards), cfg, Slicing(rank=rank, world=world, micro=micro), seed=seed,
                              start_step=start_step, steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                              counter=counter)  # fmt: skip


def test_layout_reads_footers_and_caps_rows(shards):
    assert dataset_layout(shards).rows == (5, 5, 5, 5, 3)
    assert dataset_layout(shards, max_rows=12).rows == (5, 5, 2)
    with pytest.raises(FileNotFoundError):
        dataset_layout(shards / "missing")


def test_epoch_order_is_a_seeded_permutation(shards):
    full = _epoch(shards)
    assert [p for p, _ in full] == list(range(23)) and sorted(i for _, i in full) == sorted(f"r{i}" for i in range(23))
    assert full != _epoch(shards, shuffle=False) and full == _epoch(shards)
    assert full != _epoch(shards, epoch=1)  # reshuffled every epoch
    assert _epoch(shards, start=8, stop=20) == full[8:20]  # a range starts mid-file, mid-window


def test_a_range_opens_only_the_files_that_hold_it(shards):
    whole, part = ReadCounter(), ReadCounter()
    _epoch(shards, counter=whole)
    _epoch(shards, start=0, stop=5, shuffle=False, counter=part)  # exactly the first shard
    assert whole.opens == 5 and part.opens == 1 and 0 < part.bytes < whole.bytes / 3


def test_a_step_takes_one_row_from_each_slot(shards):
    """G = 8 slots of L = 2 positions: step 0 = positions 0, 2, 4, ..., 14 of the epoch order."""
    full = dict(_epoch(shards))
    step0 = [i for batch in itertools.islice(_stream(shards, micro=4), 2) for i in _ids(batch)]
    assert step0 == [full[p] for p in step_positions(0, global_batch=8, steps_per_epoch=2)]
    assert step_positions(1, global_batch=8, steps_per_epoch=2) == [1, 3, 5, 7, 9, 11, 13, 15]


def test_global_batches_do_not_depend_on_the_worker_split(shards):
    """1 worker × accumulation 4 sees the same examples per step as 2 workers × accumulation 2."""

    def steps(world: int, accum: int) -> list[set[str]]:
        streams = [_stream(shards, world=world, rank=r) for r in range(world)]
        return [{i for s in streams for _ in range(accum) for i in _ids(next(s))} for _ in range(4)]

    one, two = steps(1, 4), steps(2, 2)
    assert one == two and all(len(s) == 8 for s in one)
    assert one[0] | one[1] != one[2] | one[3]  # epoch 2 is another permutation (and drops other tail rows)


def test_resume_starts_every_slot_at_the_step_without_replay(shards):
    full = _stream(shards, micro=4, steps_per_epoch=2)
    batches = [_ids(next(full)) for _ in range(8)]  # 2 steps of epoch 0, 2 of epoch 1 (2 micro-batches a step)
    resumed = _stream(shards, micro=4, start_step=1, steps_per_epoch=2)
    assert [_ids(next(resumed)) for _ in range(6)] == batches[2:]


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """96 rows in shards of 12 rows."""
    folder = tmp_path_factory.mktemp("pref-big")
    return write_preference_shards([_row(i) for i in range(96)], folder, rows_per_shard=12)


@pytest.mark.parametrize("world", [2, 4])
def test_each_worker_reads_about_its_share_of_the_bytes(big_shards, world):
    """One epoch (G = 8, L = 12 steps): worker r reads ~1/N of what one worker alone reads, and the workers
    together see every used row exactly once."""
    alone = ReadCounter()
    seen_alone = [i for b in itertools.islice(_stream(big_shards, micro=8, steps_per_epoch=12, counter=alone,
                                                      window=4), 12) for i in _ids(b)]  # fmt: skip
    counters, seen = [ReadCounter() for _ in range(world)], []
    for r, counter in enumerate(counters):
        stream = _stream(big_shards, world=world, rank=r, micro=8 // world, steps_per_epoch=12, counter=counter,
                         window=4)  # fmt: skip
        seen += [i for b in itertools.islice(stream, 12) for i in _ids(b)]
    assert sorted(seen) == sorted(seen_alone) and len(set(seen)) == 96
    for counter in counters:
        assert counter.bytes <= 1.25 * alone.bytes / world  # a slot boundary inside a file re-reads that file
        assert counter.bytes >= 0.75 * alone.bytes / world


def test_a_range_starting_inside_a_file_skips_the_row_groups_before_it(tmp_path):
    """One file of four row groups (PREFERENCE_ROW_GROUP rows each): the last 40 positions come out as in the
    whole epoch, and reading them reads the file's last group (plus footer), not the whole file."""
    import random

    import pyarrow.parquet as pq

    from hscr_platform.data.schema import PREFERENCE_ROW_GROUP

    noise = random.Random(0)  # ~1 KB of incompressible text a row, so row data outweighs the parquet footer
    n = 4 * PREFERENCE_ROW_GROUP
    rows = [{**_row(i), "question": "".join(noise.choices("abcdefghij", k=1024))} for i in range(n)]
    folder = write_preference_shards(rows, tmp_path, rows_per_shard=n)
    assert pq.ParquetFile(next(folder.glob("part-*.parquet"))).metadata.num_row_groups == 4
    cfg = PrefDataConfig(path=str(folder), shuffle_window=8)
    layout = dataset_layout(folder)
    whole, tail = ReadCounter(), ReadCounter()
    full = [(p, r["id"]) for p, r in iter_positions(layout, cfg, epoch=0, seed=3, start=0, stop=n, counter=whole)]
    part = [(p, r["id"]) for p, r in iter_positions(layout, cfg, epoch=0, seed=3, start=n - 40, stop=n, counter=tail)]
    assert part == full[n - 40 :]
    assert tail.bytes < 0.5 * whole.bytes  # one group of four + footer and read-ahead (0.42); all four before
    # a start on a group boundary, one inside the first group, and a range across groups: the same rows too
    head = ReadCounter()
    assert [(p, r["id"]) for p, r in iter_positions(layout, cfg, epoch=0, seed=3, start=0, stop=30,
                                                    counter=head)] == full[:30]  # fmt: skip
    assert head.bytes < 0.5 * whole.bytes  # the first group only: the groups after it are never read
    for start in (PREFERENCE_ROW_GROUP, 5, PREFERENCE_ROW_GROUP - 10):
        got = [(p, r["id"]) for p, r in iter_positions(layout, cfg, epoch=0, seed=3, start=start, stop=start + 30)]
        assert got == full[start : start + 30]
