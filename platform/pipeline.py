"""The end-to-end job (``python -m jobs.pipeline``): each stage is an ordinary job run from its own profile.

    SynthMed (or ingested data) -> base model (SFT) -> sample answers / evaluation report

Each stage's config is its job's profile YAML plus the pipeline's per-stage overrides, with the paths that
connect stages filled in by the pipeline. A stage whose output folder is complete for the same config hash is
skipped, so a re-run only does what changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hscr_platform.cache import is_complete, mark_complete, read_summary
from hscr_platform.config import config_hash, load_config
from hscr_platform.runtime import RayConfig


@dataclass(frozen=True, kw_only=True)
class ProfilesConfig:
    """The profile YAML of each stage (paths relative to the working directory)."""

    synthmed: str = "jobs/configs/synthmed/demo.yaml"
    sft: str = "jobs/configs/sft/demo.yaml"


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """End to end: SynthMed -> base Med-VLM -> report, every stage cached by config hash."""

    root: str = "runs/demo"  # every stage writes under <root>/<stage>/<config hash>/
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> ["key=value", ...]
    examples: int = 12  # sample answers printed at the end
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        unknown = set(self.overrides) - {"synthmed", "sft"}
        if unknown:
            raise ValueError(f"overrides for unknown stage(s) {sorted(unknown)}; stages: ['synthmed', 'sft']")


def _stage_config(cls: type, profile: str, extra: Sequence[str], cfg: PipelineConfig, stage: str) -> Any:
    if not Path(profile).is_file():
        raise FileNotFoundError(f"profiles.{stage}: {profile} does not exist")
    return load_config(cls, profile, [*cfg.overrides.get(stage, ()), *extra])


@dataclass(frozen=True)
class Plan:
    """Every stage's resolved job config, built (and so validated) before any stage runs."""

    synthmed: Any
    synthmed_dir: Path
    sft: Any


def plan(cfg: PipelineConfig) -> Plan:
    """Resolve each stage's config from its profile, the overrides and the upstream stage's output paths."""
    from hscr_platform.sft import SftJobConfig
    from hscr_platform.synthmed import SynthMedJobConfig

    world = _stage_config(SynthMedJobConfig, cfg.profiles.synthmed, [], cfg, "synthmed")
    data = Path(cfg.root) / "synthmed" / config_hash(world.synthmed)
    synthmed = _stage_config(
        SynthMedJobConfig, cfg.profiles.synthmed, [f"output.path={data}", "output.overwrite=true"], cfg, "synthmed"
    )
    paths = [f"data.train={data / 'train'}", f"data.eval={data / 'test'}", f"output.root={cfg.root}"]
    sft = _stage_config(SftJobConfig, cfg.profiles.sft, paths, cfg, "sft")
    return Plan(synthmed=synthmed, synthmed_dir=data, sft=sft)


def run_synthmed(stages: Plan) -> Path:
    """Generate SynthMed into <root>/synthmed/<hash of the world's config>, unless it is already there."""
    from hscr_platform.synthmed import run as synthmed_run

    out = stages.synthmed_dir
    if is_complete(out):
        print(f"[pipeline] synthmed: cached {out}")
        return out
    summary = synthmed_run(stages.synthmed)
    mark_complete(out, stages.synthmed, **(summary if isinstance(summary, dict) else {}))
    return out


def _table(metrics: dict[str, Any]) -> str:
    rows = [("closed accuracy", metrics.get("closed_accuracy")), ("open recall", metrics.get("open_recall"))]
    rows += [("presence accuracy", metrics.get("presence_accuracy"))]
    rows += [("presence: says yes", metrics.get("presence_yes_rate"))]
    rows += [("presence: truth is yes", metrics.get("presence_truth_yes_rate"))]
    rows += [("presence: false yes", metrics.get("presence_false_yes_rate"))]
    rows += [(f"type {t}", v["score"]) for t, v in metrics.get("per_type", {}).items()]
    lines = ["| metric | base model |", "|---|---|"]
    lines += [f"| {name} | {value if value is None else f'{value:.3f}'} |" for name, value in rows]
    return "\n".join(lines)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage in order; print the comparison table and where everything is."""
    t0 = time.time()
    stages = plan(cfg)  # a bad key in any stage fails here, before any work
    data = run_synthmed(stages)
    from hscr_platform.sft import run as sft_run

    sft = dict(sft_run(stages.sft))
    model_dir = Path(sft["model"])
    report = json.loads((model_dir.parent / "eval.json").read_text()) if (model_dir.parent / "eval.json").is_file() else {}
    print("\n" + _table(report.get("metrics", {})))
    print("\nSample answers of the base model (balanced test split):")
    for ex in report.get("examples", [])[: cfg.examples]:
        print(f"  Q: {ex['question']:<40} truth: {ex['answer']:<28} model: {ex['prediction']}")
    print(f"\n[pipeline] done in {time.time() - t0:.0f}s. data: {data}  base model: {model_dir}")
    return {"data": str(data), "sft": read_summary(model_dir.parent)}
