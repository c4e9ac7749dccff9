"""The end-to-end benchmarks at a small size (CI's version of ``jobs.benchmark scale`` / ``badinput``): the JSON
has its keys, every id comes out exactly once, bad rows are rejects with their reason. No wall-clock or ratio
assertions: those are the benchmark's numbers, not properties."""

from __future__ import annotations

from pathlib import Path

import pytest

from hscr_platform.core.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_scale_run_reports_memory_throughput_and_exactly_once(tmp_path):
    from hscr_platform.bench.scale import ScaleBenchConfig, run

    overrides = ["rows=[200,400]", f"workdir={tmp_path}", "rows_per_shard=128", "chunk_rows=64",
                 "sample_interval=0.5"]  # fmt: skip
    result = run(load_config(ScaleBenchConfig, None, overrides))
    assert {"rss_ratio", "throughput_ratio", "exactly_once", "sizes", "rss_ratio_by_role", "plot"} <= result.keys()
    assert result["exactly_once"] is True and Path(result["plot"]).is_file()
    assert [s["rows"] for s in result["sizes"]] == [200, 400]
    for size in result["sizes"]:
        assert size["output"]["rows"] == size["rows"] and size["output"]["preferences"] > 0
        assert size["train"]["steps"] >= 1 and size["rows_per_s"] > 0
        roles = size["peak_rss_mib"]
        assert roles["generate/driver"] > 0 and roles["train/driver"] > 0
        assert any(r.startswith("generate/ray::") for r in roles)  # the generation actors were sampled
        assert any(r.startswith("train/ray::") for r in roles)  # and the Train workers
        reads = size["train_bytes_per_worker"]
        assert len(reads["bytes_read"]) == 2 and all(b > 0 for b in reads["bytes_read"])  # ~1/2 only at scale
    own = [r for r in result["rss_ratio_by_role"] if r.endswith("/driver") or "/ray::" in r]
    assert result["rss_ratio"] == max(result["rss_ratio_by_role"][r] for r in own)


def test_bad_input_killed_once_every_id_once_every_bad_row_rejected_with_its_reason(tmp_path):
    from hscr_platform.bench.badinput import KINDS, BadInputBenchConfig, run

    overrides = ["rows=300", "bad_fraction=0.04", "chunk_rows=32", "rows_per_shard=128", f"workdir={tmp_path}"]
    result = run(load_config(BadInputBenchConfig, None, overrides))
    assert result["killed"] and result["chunks_committed_at_kill"] >= 1
    assert result["exactly_once"] is True and result["rows"] == 300
    assert result["bad_found"] is True and result["bad_missing"] == []
    assert set(result["bad_rows_by_kind"]) == set(KINDS) and result["bad_rows"] == 12
    assert result["summary_matches_rejects"] is True
    for kind, n in result["bad_rows_by_kind"].items():
        assert result["summary_reject_reasons"][kind] >= n
