"""The seeded ablation on the tiny world: selection never opens the test split; every method is trained with its
chosen config, HSCR round 2 regenerates with its round-1 model, and the report is written. One seed keeps this
within CI's time (each tiny training run starts Ray Train + DeepSpeed); the intervals over seeds and the paired
difference are tested on hand-computed numbers in tests/unit/test_ablation.py and tests/unit/test_stats.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hscr_platform.core.config import load_config
from hscr_platform.pipeline import PipelineConfig, plan, run_ablation_test, run_inputs, run_selection

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_ablation_selects_on_validation_and_reports_over_seeds(tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(REPO)  # profiles are relative to the repository, as for `python -m jobs.pipeline`
    overrides = [f"root={tmp_path / 'ab'}", "ablation.methods=[dpo, hscr]", "ablation.seeds=[3]",
                 "ablation.trials=1", "ablation.rounds=2", "ablation.validation_samples=8",
                 "ablation.lr={low: 1.0e-4, high: 1.0e-3}"]  # fmt: skip
    cfg = load_config(PipelineConfig, REPO / "jobs/configs/pipeline/tiny.yaml", overrides)
    stages = plan(cfg)
    try:
        results = run_inputs(stages)
        test_dir, hidden = stages.synthmed_dir / "test", tmp_path / "test-hidden"
        shutil.move(test_dir, hidden)  # whatever reads test while choosing fails here
        try:
            chosen = run_selection(stages)
        finally:
            shutil.move(hidden, test_dir)
        report = run_ablation_test(cfg, stages, chosen, results)
    finally:
        ray.shutdown()
    assert set(chosen) == {"dpo", "hscr"} and all(c["parent_run_id"] for c in chosen.values())
    saved = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert set(saved["models"]) == {"dpo-s3", "hscr-s3", "hscr_r2-s3"}
    assert len(set(saved["models"].values())) == 3  # three distinct trained models
    closed = saved["table"]["closed_accuracy"]
    assert set(closed) == {"base", "dpo", "hscr", "hscr_r2"} and len(closed["hscr"]) == 1
    text = report.read_text()
    assert "## HSCR − plain DPO (paired by seed)" in text and "- closed_accuracy:" in text
    assert "one seed: no interval" in text
    assert "## Differences paired over test rows" in text and "- hscr − dpo, closed_accuracy (" in text
    assert "- hscr_r2 − hscr, closed_accuracy (" in text
    assert "Not every method of the order was run." in text  # explicit / implicit were left out here
    round_two = sorted((tmp_path / "ab" / "ablation" / "round2").iterdir())
    assert len(round_two) == 1 and all((r / "preferences").is_dir() for r in round_two)
