"""Preference generation end to end on a private local Ray (2 CPUs, the tiny toy model): bad rows become
rejects with reasons, every input row comes out exactly once, a stopped or killed run resumes, and the output
is the same for the same seed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hscr_platform.core.config import load_config
from hscr_platform.core.io import read_table
from hscr_platform.data.schema import PREFERENCE_SCHEMA, REJECT_SCHEMA, SAMPLE_SCHEMA
from hscr_platform.generation.job import GenerateJobConfig, run

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

QA = [
    ("is there a nodule?", "yes"),
    ("where is the mass?", "left"),
    ("what modality is this?", "ct"),
    ("describe the image.", "ct of the chest showing a nodule on the left."),
    ("is there a mass?", "no"),
]
BAD = {  # id -> expected reject reason
    "bad-corrupt": "unreadable_image",
    "bad-truncated": "truncated_image",
    "bad-noimage": "missing_image",
    "bad-question": "empty_question",
    "bad-answer": "empty_answer",
    "bad-long": "answer_too_long",
    "bad-utf8": "invalid_utf8",
    "good-0": "duplicate_id",
}


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: str, image: bytes | None, question: str, answer: str) -> dict:
    return {
        "id": i,
        "source": "test",
        "split": "train",
        "image": image,
        "question": question,
        "answer": answer,
        "answer_type": "open",
        "question_type": "test",
    }


def write_samples(folder: Path, *, good: int = 22) -> list[str]:
    """Two shards: good rows with the bad rows mixed in; returns every row's id in input order."""
    rng = np.random.default_rng(0)
    rows = [_row(f"good-{i}", _png(rng), *QA[i % len(QA)]) for i in range(good)]
    png = _png(rng)
    bad = [
        _row("bad-corrupt", b"not an image", "is there a mass?", "no"),
        _row("bad-truncated", png[: len(png) // 2], "is there a mass?", "no"),
        _row("bad-noimage", None, "is there a mass?", "no"),
        _row("bad-question", png, "   ", "yes"),
        _row("bad-answer", png, "is there a mass?", ""),
        _row("bad-long", png, "describe.", "nodule " * 120),
        _row("bad-utf8", png, "XX", "yes"),
        _row("good-0", png, "is there a mass?", "no"),
    ]
    for k, b in enumerate(bad):
        rows.insert(3 + 3 * k, b)
    schema = pa.schema([f.with_nullable(True) for f in SAMPLE_SCHEMA if f.name in rows[0]])
    folder.mkdir(parents=True)
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist(part, schema=schema)
        if any(r["id"] == "bad-utf8" for r in part):  # invalid UTF-8 bytes inside a string column
            raw = [b"\xff\xfe bad" if r["id"] == "bad-utf8" else r["question"].encode() for r in part]
            table = table.set_column(4, "question", pa.array(raw, pa.binary()).view(pa.string()))
        pq.write_table(table, folder / f"part-{n:05d}.parquet", row_group_size=7)
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("gen") / "samples"
    return folder, write_samples(folder)


def config(samples_dir: Path, model_dir: Path, out: Path, *extra: str) -> GenerateJobConfig:
    overrides = [
        f"data.input={samples_dir}",
        f"model.path={model_dir}",
        f"output.path={out}",
        "data.chunk_rows=6",
        "compute.batch_size=4",
        *extra,
    ]
    return load_config(GenerateJobConfig, REPO / "jobs/configs/generate/tiny.yaml", overrides)


def assert_exactly_once(out: Path, ids: list[str]) -> None:
    prefs = read_table(out / "preferences", columns=["id"]).column("id").to_pylist()
    rejects = read_table(out / "rejects", columns=["id"]).column("id").to_pylist()
    assert Counter(prefs + rejects) == Counter(ids)


def sorted_preferences(out: Path) -> list[dict]:
    return sorted(read_table(out / "preferences").to_pylist(), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def full_run(ray_local, samples, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "full"
    summary = run(config(samples[0], tiny_model_dir, out, "tracking.enabled=true"))
    return out, summary


def test_end_to_end_with_bad_rows(full_run, samples):
    out, summary = full_run
    _, ids = samples
    assert_exactly_once(out, ids)
    rejects = read_table(out / "rejects")
    assert rejects.schema.equals(REJECT_SCHEMA)
    reasons = {(r["id"], r["reason"]) for r in rejects.to_pylist()}
    assert {(i, reason) for i, reason in BAD.items()} <= reasons
    prefs = read_table(out / "preferences")
    assert prefs.schema.equals(PREFERENCE_SCHEMA) and prefs.num_rows >= 10
    assert summary["status"] == "done" and summary["rows"] == len(ids)
    assert summary["preferences"] + summary["rejects"] == len(ids)
    assert (out / "reward_view.html").read_text().count('class="ex"') == 8
    assert (out.parent / "mlflow.db").is_file()


def test_preference_rows_are_consistent(full_run):
    out, _ = full_run
    for row in read_table(out / "preferences").to_pylist():
        k = row["num_levels"]
        assert 1 <= k <= 3 and len(row["responses"]) == len(row["response_token_ids"]) == len(row["ref_logps"]) == k + 1
        assert len(row["token_shift"]) == len(row["token_reward"]) == len(row["response_token_ids"][0])
        assert row["similarity"] == sorted(row["similarity"], reverse=True)
        assert all(a - b >= 0.1 - 1e-6 for a, b in zip(row["similarity"], row["similarity"][1:], strict=False))
        for j in range(k):
            level = row["response_token_ids"][j + 1]
            for p, orig, new in zip(
                row["replaced_positions"][j],
                row["original_token_ids"][j],
                row["replacement_token_ids"][j],
                strict=True,
            ):
                assert row["response_token_ids"][0][p] == orig != new == level[p]
        for logp, token_logps in zip(row["ref_logps"], row["ref_token_logps"], strict=True):
            assert logp == pytest.approx(sum(token_logps), abs=1e-3)


def test_stop_and_resume_gives_the_uninterrupted_output(full_run, samples, tiny_model_dir, tmp_path):
    out = tmp_path / "resumed"
    first = run(config(samples[0], tiny_model_dir, out, "run.stop_after_chunks=2"))
    assert first["status"] == "stopped" and first["chunks_committed"] == 2
    # leftovers of a run killed between writing a shard and its manifest entry must not survive the resume
    (out / "preferences" / "part-00004.parquet").write_bytes(b"half written")
    (out / "rejects" / "part-00005.parquet.tmp").write_bytes(b"")
    second = run(config(samples[0], tiny_model_dir, out))
    assert second["status"] == "done" and second["chunks_committed"] == second["chunks"]
    assert_exactly_once(out, samples[1])
    assert sorted_preferences(out) == sorted_preferences(full_run[0])  # deterministic for a seed


def test_output_of_another_config_is_refused(full_run, samples, tiny_model_dir):
    with pytest.raises(ValueError, match="different generation config"):
        run(config(samples[0], tiny_model_dir, full_run[0], "hscr.seed=1"))


def test_killed_job_resumes_exactly_once(full_run, samples, tiny_model_dir, tmp_path):
    import ray

    out = tmp_path / "killed"
    overrides = [
        f"data.input={samples[0]}",
        f"model.path={tiny_model_dir}",
        f"output.path={out}",
        "data.chunk_rows=6",  # as in full_run: the same micro-batches, so the same floats
        "compute.batch_size=4",
        f"ray.address={ray.get_runtime_context().gcs_address}",
    ]
    cmd = [sys.executable, "-m", "jobs.generate", "--config", "jobs/configs/generate/tiny.yaml", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # the job joins this test's Ray; killing its driver ends its actors too (they share its fate)
        deadline = time.time() + 300
        while len(list((out / "_manifest").glob("chunk-*.json"))) < 2 and time.time() < deadline:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list((out / "_manifest").glob("chunk-*.json")))
    total = json.loads((out / "_manifest" / "run.json").read_text())["chunks"]
    # on an idle machine Ray Data can finish every chunk before the driver's first commits land, so the kill may
    # come after the last commit; either way the rerun must neither duplicate nor lose an id
    assert 1 <= done <= total
    summary = run(load_config(GenerateJobConfig, REPO / "jobs/configs/generate/tiny.yaml", overrides))
    assert summary["status"] == "done" and summary["chunks_committed"] == summary["chunks"]
    assert_exactly_once(out, samples[1])
    assert sorted_preferences(out) == sorted_preferences(full_run[0])


def test_split_layout_gives_the_fused_rows(full_run, samples, tiny_model_dir, tmp_path):
    pools = [f"compute.{pool}.cpus=0.3" for pool in ("scorer", "decoder", "finisher")]
    out = tmp_path / "split"
    run(config(samples[0], tiny_model_dir, out, "compute.layout=split", "data.max_rows=6", *pools))
    fused = {r["id"]: r for r in read_table(full_run[0] / "preferences").to_pylist()}
    split = read_table(out / "preferences").to_pylist()
    assert split
    for row in split:
        assert row["response_token_ids"] == fused[row["id"]]["response_token_ids"]
        assert row["ref_logps"] == pytest.approx(fused[row["id"]]["ref_logps"], abs=1e-4)
