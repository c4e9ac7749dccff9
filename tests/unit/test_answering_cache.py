"""A sweep rerun reuses a finished trial's validation scores, and only when nothing they depend on changed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.models import answering


def test_scores_are_reused_until_the_settings_or_the_data_change(tmp_path, monkeypatch):
    calls = []

    def fake(model_dir, data_dir, **settings):
        calls.append(settings)
        return {"metrics": {"closed_accuracy": 0.5 + len(calls) / 10}, "examples": []}

    monkeypatch.setattr(answering, "evaluate_folder", fake)
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    data = tmp_path / "validation"
    data.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), data / "part-00000.parquet")

    first = answering.evaluate_folder_cached(model, data, samples=4, batch_size=2, max_new_tokens=8)
    again = answering.evaluate_folder_cached(model, data, samples=4, batch_size=2, max_new_tokens=8)
    assert first == again and first["metrics"]["closed_accuracy"] == 0.6 and len(calls) == 1
    assert len(list((tmp_path / "run").glob("scores-*.json"))) == 1

    more = answering.evaluate_folder_cached(model, data, samples=8, batch_size=2, max_new_tokens=8)
    assert more["metrics"]["closed_accuracy"] == 0.7 and len(calls) == 2  # other settings: answered again

    pq.write_table(pa.table({"x": [1, 2, 3]}), data / "part-00001.parquet")  # the data folder grew
    answering.evaluate_folder_cached(model, data, samples=4, batch_size=2, max_new_tokens=8)
    assert len(calls) == 3
