"""predictions.parquet is written chunk by chunk: same records as converting everything at once, bounded chunks."""

from __future__ import annotations

import pyarrow.parquet as pq

from hscr_platform.evaluation import job
from hscr_platform.evaluation.metrics import row_records


def _rows(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "source": "synthmed", "question": "is there a nodule?", "answer": "yes" if i % 2 else "no",
         "answer_type": "closed", "question_type": "presence", "findings": None}
        for i in range(n)
    ]  # fmt: skip


def test_predictions_are_written_in_chunks_with_every_record(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "PREDICTION_CHUNK", 4)
    rows, answers = _rows(10), ["yes"] * 10
    path = tmp_path / "predictions.parquet"
    with job.PredictionWriter(path) as writer:
        for model in ("base", "hscr"):
            writer.write(rows, answers, model=model, view="image")
    parquet = pq.ParquetFile(path)
    assert writer.rows == 20 and parquet.metadata.num_row_groups == 6  # 4 + 4 + 2 rows per model
    expected = [r for m in ("base", "hscr") for r in row_records(rows, answers, model=m, view="image")]
    got = parquet.read().to_pylist()
    assert got == expected and sum(r["score"] for r in got) == 10  # the 5 "yes" truths, twice
