"""Answering batches rows by question (a batch of yes/no questions stops early) and still returns row order."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.evaluation.job import read_shards
from hscr_platform.models import answering
from hscr_platform.models.loading import ModelConfig, load_vlm

QUESTIONS = ["describe the image.", "is there a mass?", "describe the image.", "is there a nodule?", "is there a mass?"]


def test_question_order_groups_equal_questions_and_is_stable():
    assert answering.question_order(QUESTIONS) == [0, 2, 1, 4, 3]
    assert answering.question_order([]) == []


def test_answer_rows_batches_in_question_order_and_answers_in_row_order(monkeypatch):
    batches = []

    def fake_generate(model, processor, images, questions, *, max_new_tokens):
        batches.append(list(questions))
        return [f"{q} #{len(batches)}" for q in questions]

    monkeypatch.setattr(answering, "generate_answers", fake_generate)
    monkeypatch.setattr(answering, "open_image", lambda data: data)
    rows = [{"image": i, "question": q} for i, q in enumerate(QUESTIONS)]
    got = answering.answer_rows(None, None, rows, batch_size=2, max_new_tokens=4)
    assert batches == [["describe the image.", "describe the image."], ["is there a mass?", "is there a mass?"],
                       ["is there a nodule?"]]  # fmt: skip
    assert got == [
        "describe the image. #1", "is there a mass? #2", "describe the image. #1", "is there a nodule? #3",
        "is there a mass? #2",
    ]  # fmt: skip


def test_greedy_answers_do_not_depend_on_the_batch_order(tiny_model_dir, noise_images):
    model, processor = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    encoded = []
    for image in noise_images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    questions = [*QUESTIONS, "what modality is this?", "where is the mass?"]
    rows = [{"image": encoded[i % 2], "question": q} for i, q in enumerate(questions)]
    batched = answering.answer_rows(model, processor, rows, batch_size=3, max_new_tokens=6)
    alone = [answering.answer_rows(model, processor, [r], batch_size=1, max_new_tokens=6)[0] for r in rows]
    assert batched == alone and any(batched)


def test_the_evaluation_reads_each_shard_in_question_order(tmp_path):
    path = tmp_path / "part-00000.parquet"
    n = len(QUESTIONS)
    pq.write_table(
        pa.table({"source": ["s"] * n, "id": [str(i) for i in range(n)], "image": [b"x"] * n, "question": QUESTIONS}),
        path,
    )
    out = read_shards(pa.table({"file": [str(path)]}), keys=None, views=("image", "blank"))
    assert out.column("question").to_pylist() == sorted(QUESTIONS * 2)
    pairs = list(zip(out.column("id").to_pylist(), out.column("view").to_pylist(), strict=True))
    assert sorted(pairs) == sorted((str(i), v) for i in range(n) for v in ("image", "blank"))  # nothing lost
    assert pairs[:2] == [("0", "image"), ("2", "image")]  # stable: row order within a question and view
