"""Every job on the vLLM engine (CPU tier): jobs.generate in the fused, split and vllm layouts and jobs.evaluate,
with no vLLM memory settings (the CPU defaults must work), checked like the transformers runs: ids exactly once,
consistent levels, reference log-probs, metrics; and a vLLM engine that dies mid-chunk.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hscr_platform.core.config import load_config
from hscr_platform.core.io import read_table

REPO = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.find_spec("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_SPEC is None or _SPEC.origin is None, reason="needs vllm")]
ROWS = 10


def _generate_config(synth_data: Path, model_dir: Path, out: Path, *extra: str):
    from hscr_platform.generation.job import GenerateJobConfig

    overrides = [
        f"data.input={synth_data / 'train'}", f"model.path={model_dir}", f"output.path={out}",
        f"data.max_rows={ROWS}", "data.chunk_rows=5", "compute.batch_size=4", "hscr.shift=logprob",
        "hscr.alpha=0.3", *extra,
    ]  # fmt: skip
    return load_config(GenerateJobConfig, REPO / "jobs/configs/generate/tiny.yaml", overrides)


def _input_ids(synth_data: Path) -> list[str]:
    return read_table(synth_data / "train", columns=["id"]).column("id").to_pylist()[:ROWS]


def _check_output(out: Path, ids: list[str]) -> dict[str, dict]:
    """ids exactly once; levels, replacements and reference log-probs consistent; rows by id."""
    prefs = read_table(out / "preferences").to_pylist()
    rejects = read_table(out / "rejects", columns=["id"]).column("id").to_pylist() if (out / "rejects").exists() else []
    assert Counter([p["id"] for p in prefs] + rejects) == Counter(ids)
    assert prefs, "no preference rows to check"
    for row in prefs:
        k = row["num_levels"]
        assert 1 <= k <= 3 and len(row["responses"]) == len(row["ref_logps"]) == len(row["ref_token_logps"]) == k + 1
        for j in range(k):
            for p, orig, new in zip(
                row["replaced_positions"][j], row["original_token_ids"][j], row["replacement_token_ids"][j], strict=True
            ):
                assert row["response_token_ids"][0][p] == orig != new == row["response_token_ids"][j + 1][p]
        for logp, token_logps, ids_ in zip(
            row["ref_logps"], row["ref_token_logps"], row["response_token_ids"], strict=True
        ):
            assert len(token_logps) == len(ids_) and logp == pytest.approx(sum(token_logps), abs=1e-3)
    return {p["id"]: p for p in prefs}


@pytest.fixture(scope="module")
def transformers_rows(ray_local, synth_data, confident_model_dir, tmp_path_factory):
    from hscr_platform.generation.job import run

    out = tmp_path_factory.mktemp("gen") / "transformers"
    run(_generate_config(synth_data, confident_model_dir, out))
    return _check_output(out, _input_ids(synth_data))


@pytest.mark.parametrize(
    "layout",
    [
        ("compute.layout=vllm", "scorer.engine=vllm", "decoder.engine=vllm"),
        ("compute.layout=split", "decoder.engine=vllm", *(f"compute.{p}.cpus=0.3" for p in ("scorer", "decoder"))),
        # the fused layout with both engines on vLLM: the same engine code as the vllm layout (make test-slow)
        pytest.param(("compute.layout=fused", "scorer.engine=vllm", "decoder.engine=vllm"), marks=pytest.mark.slow),
    ],
    ids=["vllm-layout", "split-vllm-decoder", "fused-vllm-both"],
)
def test_generate_on_vllm_gives_the_transformers_rows(
    layout, transformers_rows, synth_data, confident_model_dir, tmp_path
):
    from hscr_platform.generation.job import run

    out = tmp_path / "vllm"
    summary = run(_generate_config(synth_data, confident_model_dir, out, *layout))
    assert summary["status"] == "done" and summary["rows"] == ROWS
    got = _check_output(out, _input_ids(synth_data))
    assert set(got) == set(transformers_rows)
    worst = 0.0
    for key, row in got.items():
        want = transformers_rows[key]
        assert row["response_token_ids"] == want["response_token_ids"], key
        assert row["coupled_positions"] == want["coupled_positions"], key
        for a, b in zip(row["ref_token_logps"], want["ref_token_logps"], strict=True):
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
    print(
        f"\n[{layout[0]}] {len(got)} preference rows equal transformers'; ref token log-probs differ by <= {worst:.2e}"
    )
    assert worst < 1e-4


def test_evaluate_on_vllm_gives_the_transformers_answers(ray_local, synth_data, confident_model_dir, tmp_path):
    from hscr_platform.evaluation.job import EvaluateJobConfig, run

    results = {}
    for engine in ("hf", "vllm"):
        overrides = [
            f"data.path={synth_data / 'test'}", f"models={{toy: '{confident_model_dir}'}}", f"engine={engine}",
            "data.max_rows=8", f"output.path={tmp_path / engine}", "tracking.enabled=false",
        ]  # fmt: skip
        results[engine] = run(load_config(EvaluateJobConfig, REPO / "jobs/configs/evaluate/tiny.yaml", overrides))
    hf, vllm = (results[e]["results"]["toy"] for e in ("hf", "vllm"))
    assert results["vllm"]["rows"] == 8
    for key in ("closed_accuracy", "open_recall"):
        assert vllm[key] == hf[key], key
    predictions = {e: pq.read_table(tmp_path / e / "predictions.parquet").to_pylist() for e in results}
    assert [p["prediction"] for p in predictions["vllm"]] == [p["prediction"] for p in predictions["hf"]]


# --- a vLLM engine that dies mid-chunk --------------------------------------------------------------------


def _worker_states(synth_data: Path, n: int) -> list[dict]:
    rows = read_table(synth_data / "train").to_pylist()[:n]
    return [{**r, "chunk": 0, "row": i} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def fused_vllm_worker(synth_data, confident_model_dir, tmp_path_factory):
    from hscr_platform.generation.worker import Worker, WorkerSpec

    cfg = _generate_config(
        synth_data,
        confident_model_dir,
        tmp_path_factory.mktemp("w") / "out",
        "scorer.engine=vllm",
        "decoder.engine=vllm",
    )
    worker = Worker(WorkerSpec(cfg, str(confident_model_dir), "fp", "hash"), parts=("score", "decode", "finish"))
    yield worker
    worker.engine.close()


def _die_on_next_generate(engine) -> None:
    """The engine core stops and vLLM raises what it raises when its core process has died."""
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = engine.llm

    def dying(*args, **kwargs):
        llm.llm_engine.engine_core.shutdown()
        raise EngineDeadError()

    llm.generate = dying


def test_an_engine_that_dies_is_restarted_and_the_batch_redone(fused_vllm_worker, synth_data):
    worker = fused_vllm_worker
    states = _worker_states(synth_data, 6)
    _die_on_next_generate(worker.engine)
    restarts = worker.engine.restarts
    for part in ("score", "decode", "finish"):
        worker.run(states, part)
    assert worker.engine.restarts == restarts + 1
    assert not [s for s in states if s.get("reject", {}).get("reason") == "processing_error"]
    assert any("preference" in s for s in states)


def test_an_engine_that_dies_again_stops_the_chunk_not_its_rows(fused_vllm_worker, synth_data, monkeypatch):
    from hscr_platform.models.engines.vllm import EngineDied

    worker = fused_vllm_worker
    states = _worker_states(synth_data, 4)
    monkeypatch.setattr(worker.engine, "restart", lambda: _die_on_next_generate(worker.engine))
    _die_on_next_generate(worker.engine)
    with pytest.raises(EngineDied, match="EngineDeadError"):
        worker.run(states, "score")
    assert not [s for s in states if "reject" in s], "an engine failure must not turn rows into rejects"
    monkeypatch.undo()
    worker.engine.restart()  # leave a working engine behind


def test_cpu_engine_defaults_reserve_a_fixed_kv_cache():
    from hscr_platform.models.engines.vllm import CPU_KV_CACHE_BYTES, VllmConfig

    assert VllmConfig().engine_args(on_cpu=True)["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert "kv_cache_memory_bytes" not in VllmConfig().engine_args(on_cpu=False)  # GPU: vLLM's 0.9 of memory
    explicit = replace(VllmConfig(), gpu_memory_utilization=0.5).engine_args(on_cpu=True)
    assert explicit["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in explicit
