"""SFT batches: length grouping keeps every row once per epoch and puts rows of similar length together."""

from __future__ import annotations

import itertools

import pytest

from hscr_platform.training.sft_loop import batch_indices, length_grouped_batches, text_length


def _epoch(batches, n_batches):
    return [next(batches) for _ in range(n_batches)]


def test_one_pool_gives_the_sorted_cut():
    # lengths 50, 10, 40, 20, 30, 60 -> sorted rows 1 (10), 3 (20), 4 (30), 2 (40), 0 (50), 5 (60); batches of 2 are
    # {1, 3}, {4, 2}, {0, 5} whatever the permutation, in a shuffled order
    lengths = [50, 10, 40, 20, 30, 60]
    epoch = _epoch(length_grouped_batches(lengths, 2, seed=0, pool=8), 3)
    assert sorted(sorted(b) for b in epoch) == [[0, 5], [1, 3], [2, 4]]


def test_every_row_once_per_epoch_and_the_tail_dropped():
    lengths = [7, 3, 9, 1, 5, 2, 8, 4, 6, 0, 11]  # 11 rows, batches of 3: 9 rows per epoch, as batch_indices
    gen = length_grouped_batches(lengths, 3, seed=1, pool=2)
    for _ in range(3):  # three epochs
        rows = list(itertools.chain(*_epoch(gen, 3)))
        assert len(rows) == len(set(rows)) == 9


def test_less_padding_than_random_batches():
    lengths = [10 if i % 3 else 60 for i in range(96)]  # one row in three is long

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = padded(_epoch(length_grouped_batches(lengths, 8, seed=0), 12))
    plain = padded(_epoch(batch_indices(len(lengths), 8, seed=0), 12))
    assert grouped == 32 * 60 + 64 * 10  # the long rows fill 4 batches, the short ones 8
    assert plain > grouped


def test_seeded_and_checked():
    lengths = list(range(20))
    assert _epoch(length_grouped_batches(lengths, 4, seed=3, pool=2), 5) == _epoch(
        length_grouped_batches(lengths, 4, seed=3, pool=2), 5
    )
    with pytest.raises(ValueError, match="batch and pool"):
        next(length_grouped_batches(lengths, 0, seed=0))


def test_text_length_counts_question_and_answer():
    assert text_length({"question": "is there a cyst?", "answer": "no"}) == 16 + 2
