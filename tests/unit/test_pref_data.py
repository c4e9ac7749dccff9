"""Preference rows: bad rows skipped with reasons, reference source, collation shapes, the streaming order."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hscr_platform.training.pref_data import PrefDataConfig, Skip, SkipLog, as_matrix, collate, to_example
from hscr_platform.training.pref_stream import Slicing, dataset_layout, iter_micro_batches, iter_worker_rows
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


def _epoch(shards, *, world=1, rank=0, micro=2, start=0, stop=20, epoch=0, shuffle=True) -> list[tuple[int, str]]:
    cfg = PrefDataConfig(path=str(shards), shuffle_window=3, shuffle=shuffle)
    rows = iter_worker_rows(
        dataset_layout(shards),
        cfg,
        Slicing(rank=rank, world=world, micro=micro),
        epoch=epoch,
        seed=7,
        start=start,
        stop=stop,
    )
    return [(p, r["id"]) for p, r in rows]


def test_layout_reads_footers_and_caps_rows(shards):
    assert dataset_layout(shards).rows == (5, 5, 5, 5, 3)
    assert dataset_layout(shards, max_rows=12).rows == (5, 5, 2)
    with pytest.raises(FileNotFoundError):
        dataset_layout(shards / "missing")


def test_epoch_order_is_a_seeded_permutation_split_over_workers(shards):
    full = _epoch(shards, stop=23)
    assert [p for p, _ in full] == list(range(23)) and sorted(i for _, i in full) == sorted(f"r{i}" for i in range(23))
    assert full != _epoch(shards, stop=23, shuffle=False) and full == _epoch(shards, stop=23)
    assert full != _epoch(shards, stop=23, epoch=1)  # reshuffled every epoch
    parts = [_epoch(shards, world=2, rank=r, stop=23) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == full  # disjoint, together everything
    assert all((p // 2) % 2 == 0 for p, _ in parts[0])  # micro-rounds alternate between workers


def test_resume_starts_at_the_step_position_without_replay(shards):
    assert _epoch(shards, start=8, stop=20) == [x for x in _epoch(shards, stop=20) if x[0] >= 8]


def test_global_batches_do_not_depend_on_the_worker_split(shards):
    """1 worker × accumulation 4 sees the same examples per step as 2 workers × accumulation 2."""
    cfg = PrefDataConfig(path=str(shards), shuffle_window=3)

    def steps(world: int, accum: int) -> list[set[str]]:
        streams = [
            iter_micro_batches(
                dataset_layout(shards),
                cfg,
                Slicing(rank=r, world=world, micro=2),
                seed=7,
                start_step=0,
                steps_per_epoch=2,
                global_batch=8,
            )
            for r in range(world)
        ]
        return [{i for s in streams for _ in range(accum) for i in _ids(next(s))} for _ in range(4)]

    one, two = steps(1, 4), steps(2, 2)
    assert one == two and all(len(s) == 8 for s in one)
    assert one[0] | one[1] != one[2] | one[3]  # epoch 2 is another permutation (and drops other tail rows)


def test_micro_batch_stream_resumes_across_epochs(shards):
    cfg = PrefDataConfig(path=str(shards), shuffle_window=3)

    def stream(start_step: int):
        return iter_micro_batches(dataset_layout(shards), cfg, Slicing(rank=0, world=1, micro=4), seed=1,
                                  start_step=start_step, steps_per_epoch=5, global_batch=4)  # fmt: skip

    full = stream(0)
    batches = [_ids(next(full)) for _ in range(8)]  # 5 steps of epoch 0, then 3 of epoch 1
    resumed = stream(3)
    assert [_ids(next(resumed)) for _ in range(5)] == batches[3:]
