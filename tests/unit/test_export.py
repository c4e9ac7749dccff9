"""Exports of preference shards: TRL's conversational preference parquet and LLaVA-style JSON + images."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from hscr_platform.core.io import ShardWriter, read_table
from hscr_platform.data.export import ExportJobConfig, image_name, preference_pairs, run
from hscr_platform.data.schema import PREFERENCE_SCHEMA


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def preferences(tmp_path):
    rows = [
        {
            "id": "a/1",
            "image": _png(),
            "question": "is there a nodule?",
            "responses": ["yes", "no", "maybe", "none"],
            "response_token_ids": [[1], [2], [3], [4]],
            "num_levels": 3,
        },
        {
            "id": "b",
            "image": _png(),
            "question": "where?",
            "responses": ["left", "right"],
            "response_token_ids": [[1], [2]],
            "num_levels": 1,
        },
    ]
    folder = tmp_path / "preferences"
    with ShardWriter(folder, PREFERENCE_SCHEMA, rows_per_shard=1) as writer:
        writer.write_many({name: row.get(name) for name in PREFERENCE_SCHEMA.names} for row in rows)
    return folder


def test_preference_pairs_explicit_and_implicit():
    assert preference_pairs(3, pairs="explicit") == [(0, 1), (0, 2), (0, 3)]
    assert preference_pairs(3, pairs="all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert preference_pairs(1, pairs="all") == [(0, 1)]


def test_trl_export(preferences, tmp_path):
    out = tmp_path / "trl"
    summary = run(ExportJobConfig(input=str(preferences), format="trl", output=str(out), pairs="all"))
    assert summary["examples"] == 2 and summary["pairs"] == 7
    table = read_table(out)
    assert json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"huggingface"])["info"]["features"]
    first = table.to_pylist()[0]
    assert first["id"] == "a/1#0-1" and first["images"][0]["bytes"] == _png()
    assert first["prompt"][0]["role"] == "user" and first["prompt"][0]["content"][1]["text"] == "is there a nodule?"
    assert first["chosen"][0]["content"][0]["text"] == "yes" and first["rejected"][0]["content"][0]["text"] == "no"
    implicit = [r for r in table.to_pylist() if r["chosen_level"] > 0]
    assert [(r["chosen_level"], r["rejected_level"]) for r in implicit] == [(1, 2), (1, 3), (2, 3)]


def test_llava_export_writes_json_and_images(preferences, tmp_path):
    out = tmp_path / "llava"
    summary = run(ExportJobConfig(input=str(preferences), format="llava", output=str(out)))
    entries = json.loads((out / "llava.json").read_text())
    assert summary["pairs"] == len(entries) == 4
    assert entries[0]["conversations"][0]["value"] == "<image>\nis there a nodule?"
    assert (entries[0]["chosen"], entries[0]["rejected"]) == ("yes", "no")
    images = {e["image"] for e in entries}
    assert len(images) == 2 and all((out / i).read_bytes() == _png() for i in images)
    assert "/" not in image_name("a/1", _png()).replace("images/", "") and image_name("b", _png()).endswith(".png")


def test_refuses_non_empty_output_unless_overwrite(preferences, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run(ExportJobConfig(input=str(preferences), format="trl", output=str(out)))
    run(ExportJobConfig(input=str(preferences), format="trl", output=str(out), overwrite=True, max_rows=1))
    assert read_table(out).num_rows == 3
