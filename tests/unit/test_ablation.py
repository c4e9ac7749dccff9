"""The ablation's plan, table and verdict (platform/ablation.py); the run itself: tests/integration/test_ablation.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hscr_platform.ablation import (
    AblationConfig,
    order_holds,
    per_method,
    report_lines,
    row_differences,
    row_lines,
    sweep_config,
)
from hscr_platform.core.config import ConfigError, load_config
from hscr_platform.core.runtime import RayConfig
from hscr_platform.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parents[2]


def _results(values: dict[str, float]) -> dict[str, dict[str, float]]:
    return {name: {"closed_accuracy": v, "hallucination_rate": 1 - v, "seconds": 1.0} for name, v in values.items()}


RESULTS = _results({"base": 0.60, "dpo-s0": 0.66, "dpo-s1": 0.64, "explicit-s0": 0.63, "explicit-s1": 0.65,
                    "implicit-s0": 0.66, "implicit-s1": 0.68, "hscr-s0": 0.70, "hscr-s1": 0.72})  # fmt: skip
METHODS = ["dpo", "explicit", "implicit", "hscr"]


def test_per_method_collects_values_over_seeds_and_skips_non_metrics():
    table = per_method(RESULTS, METHODS, [0, 1])
    assert set(table) == {"closed_accuracy", "hallucination_rate"}  # "seconds" is not a metric
    assert table["closed_accuracy"]["base"] == [0.60]
    assert table["closed_accuracy"]["hscr"] == [0.70, 0.72]


def test_order_and_paired_verdict_in_the_report():
    table = per_method(RESULTS, METHODS, [0, 1])
    assert order_holds(table) is True
    assert order_holds(table, "hallucination_rate") is True  # lower is better there
    swapped = per_method({**RESULTS, **_results({"implicit-s0": 0.60, "implicit-s1": 0.61})}, METHODS, [0, 1])
    assert order_holds(swapped) is False
    chosen = {m: {"val_score": 0.5, "params": {"optim.lr": 1e-4}} for m in METHODS}
    text = "\n".join(report_lines(table, chosen, [0, 1]))
    # HSCR - DPO: d = (0.04, 0.08), mean 0.06, std 0.028284, half 12.706 * 0.02 = 0.25412: the CI includes 0
    assert "- closed_accuracy: 0.060 ± 0.028 [-0.194, 0.314] — CI includes 0" in text
    assert "HOLDS on the means" in text
    assert "| closed_accuracy | 0.600 | 0.650 ± 0.014" in text


def test_sweeps_search_the_same_budget_and_nll_only_where_it_exists():
    ab = AblationConfig(trials=3)
    kw = dict(train_profile="jobs/configs/train/tiny.yaml", train_paths=["data.path=/p"], validation=Path("/v"),
              root="/r", tracking_uri="sqlite:////r/m.db", ray=RayConfig())  # fmt: skip
    dpo, nll = sweep_config(ab, "dpo", **kw), sweep_config(ab, "hscr_nll", **kw)
    assert dpo.search.num_samples == nll.search.num_samples == 3
    assert [d.key for d in dpo.space] == ["optim.lr", "loss.gamma"]
    assert [d.key for d in nll.space] == ["optim.lr", "loss.gamma", "loss.nll_weight"]
    assert "loss.weights=dpo" in dpo.train_overrides and "data.max_levels=2" in dpo.train_overrides
    assert dpo.objective.validation == "/v"  # selection reads validation
    # every trial of the budget is trained and scored: ASHA would prune on the training reward accuracy
    assert not dpo.search.early_stopping and not nll.search.early_stopping
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from hscr_platform.sweep import scheduler

    assert type(scheduler(dpo.search)) is FIFOScheduler
    assert isinstance(scheduler(dataclasses.replace(dpo.search, early_stopping=True)), ASHAScheduler)


def test_bad_ablation_configs_fail_at_load():
    with pytest.raises(ValueError, match="rounds: 2"):
        AblationConfig(methods=("dpo",), rounds=2)
    with pytest.raises(ValueError, match="distinct"):
        AblationConfig(seeds=(0, 0))
    with pytest.raises(ConfigError, match=r"ablation\.methods"):
        load_config(PipelineConfig, REPO / "jobs/configs/pipeline/ablation.yaml", ["ablation.methods=[ppo]"])


def test_ablation_profile_plans_every_sweep_on_validation(tmp_path):
    from hscr_platform.pipeline import plan

    cfg = load_config(PipelineConfig, REPO / "jobs/configs/pipeline/ablation.yaml", [f"root={tmp_path}"])
    stages = plan(cfg)
    assert stages.sweeps is not None and list(stages.sweeps) == list(cfg.ablation.methods)
    for sweep in stages.sweeps.values():
        assert sweep.objective.validation.endswith("validation")
    assert stages.sft.data.eval.endswith("validation")  # the base model's quick check too
    assert stages.generate.data.input.endswith("instruct")


def _record(model, row, score, *, answer_type="closed", view="image"):
    return {"model": model, "view": view, "source": "s", "id": str(row), "answer_type": answer_type, "score": score}


def test_differences_paired_over_test_rows_by_hand():
    # rows 0..3, closed. hscr seeds (1, 1), (1, 0), (0, 0), (1, 1) -> means 1, .5, 0, 1; dpo seeds (1, 0), (0, 0),
    # (0, 0), (1, 1) -> .5, 0, 0, 1. d = (.5, .5, 0, 0): mean .25, std sqrt(((.25)² · 4) / 3) = .288675,
    # half 3.182 · .288675 / 2 = .459282 -> [-0.209, 0.709]
    hscr = {0: (1, 1), 1: (1, 0), 2: (0, 0), 3: (1, 1)}
    dpo = {0: (1, 0), 1: (0, 0), 2: (0, 0), 3: (1, 1)}
    records = [_record(f"{name}-s{s}", row, table[row][s]) for name, table in (("hscr", hscr), ("dpo", dpo))
               for row in table for s in (0, 1)]  # fmt: skip
    records += [
        _record("hscr-s0", 9, 1.0),
        _record("base", 0, 0.0, view="blank"),
        _record("dpo-s0", 7, 1.0, answer_type="open"),
    ]
    assert row_differences(records, ["hscr-s0", "hscr-s1"], ["dpo-s0", "dpo-s1"], "closed") == [0.5, 0.5, 0.0, 0.0]
    lines = row_lines(records, ["dpo", "hscr"], [0, 1])
    assert "- hscr − dpo, closed_accuracy (4 rows): 0.250 ± 0.289 [-0.209, 0.709] — CI includes 0" in lines
    assert not any("hscr − base" in line for line in lines)  # base answered no closed row on the image view
