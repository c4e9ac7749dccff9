"""The end-to-end job (``python -m jobs.pipeline``): each stage is an ordinary job run from its own profile.

    SynthMed -> base model (SFT) -> HSCR preferences -> multi-level DPO (HSCR)
                                                      -> plain single-pair DPO on the same data (baseline)
             -> evaluation of base / HSCR / DPO on the balanced test split -> report

Each stage's config is its job's profile YAML plus the pipeline's per-stage overrides, with the paths that
connect stages filled in by the pipeline. Every stage config is resolved (and so validated) before any stage
runs; a stage whose outputs are complete for the same config is skipped, so a re-run only does what changed.
All stages log to one MLflow store (``tracking_uri``, default ``sqlite:///<root>/mlflow.db``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.ablation import AblationConfig
from hscr_platform.core.cache import is_complete, mark_complete, stage_dir
from hscr_platform.core.config import config_hash, load_config
from hscr_platform.core.runtime import RayConfig

STAGES = ("synthmed", "sft", "generate", "train", "dpo", "evaluate")


@dataclass(frozen=True, kw_only=True)
class ProfilesConfig:
    """The profile YAML of each stage (paths relative to the working directory)."""

    synthmed: str = "jobs/configs/synthmed/demo.yaml"
    sft: str = "jobs/configs/sft/demo.yaml"
    generate: str = "jobs/configs/generate/demo.yaml"
    train: str = "jobs/configs/train/demo.yaml"  # used by both the HSCR run and the DPO baseline
    evaluate: str = "jobs/configs/evaluate/demo.yaml"


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """End to end: SynthMed -> base Med-VLM -> HSCR data -> multi-level DPO (+ DPO baseline) -> evaluation."""

    root: str = "runs/demo"  # every stage writes under <root>/<stage>/...
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> ["key=value", ...]
    dpo_baseline: bool = True  # also train plain single-pair DPO (y_w vs the closest negative)
    generate_from: Literal["train", "instruct"] = "train"  # the SynthMed folder HSCR's entries are drawn from
    ablation: AblationConfig | None = None  # set: the seeded ablation instead of one HSCR and one DPO run
    tracking_uri: str | None = None  # null: sqlite:///<root>/mlflow.db (absolute)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        unknown = set(self.overrides) - set(STAGES)
        if unknown:
            raise ValueError(f"overrides for unknown stage(s) {sorted(unknown)}; stages: {list(STAGES)}")


@dataclass(frozen=True)
class Plan:
    """Every stage's resolved job config (built, and so validated, before any stage runs)."""

    synthmed: Any
    synthmed_dir: Path
    sft: Any
    base_model: Path
    generate: Any
    train: Any
    dpo: Any | None
    evaluate: Any
    sweeps: dict[str, Any] | None = None  # ablation: method -> its Tune sweep (validation only)


def _stage_config(cls: type, profile: str, extra: Sequence[str], cfg: PipelineConfig, stage: str) -> Any:
    if not Path(profile).is_file():
        raise FileNotFoundError(f"profiles.{stage}: {profile} does not exist")
    return load_config(cls, profile, [*cfg.overrides.get(stage, ()), *extra])


def _uri(cfg: PipelineConfig) -> str:
    return cfg.tracking_uri or f"sqlite:///{Path(cfg.root).resolve() / 'mlflow.db'}"


def _plan_data(cfg: PipelineConfig) -> tuple[Any, Path, Any, Path]:
    from hscr_platform.data.synthmed.job import SynthMedJobConfig
    from hscr_platform.training.sft import SftJobConfig

    world = _stage_config(SynthMedJobConfig, cfg.profiles.synthmed, [], cfg, "synthmed")
    data = Path(cfg.root) / "synthmed" / config_hash(world.synthmed)
    synthmed = _stage_config(
        SynthMedJobConfig,
        cfg.profiles.synthmed,
        [f"output.path={data}", "output.overwrite=true"],
        cfg,
        "synthmed",
    )
    # The ablation chooses on validation only, so the base model's quick check reads validation there too.
    check = data / ("validation" if cfg.ablation else "test")
    paths = [f"data.train={data / 'train'}", f"data.eval={check}", f"output.root={cfg.root}"]
    if world.synthmed.splits.instruct:
        paths.append(f"data.instruct={data / 'instruct'}")
    sft = _stage_config(SftJobConfig, cfg.profiles.sft, paths, cfg, "sft")
    return synthmed, data, sft, stage_dir(cfg.root, "sft", sft) / "model"


def _plan_generate(cfg: PipelineConfig, data: Path, base: Path) -> Any:
    from hscr_platform.generation.job import GenerateJobConfig, generation_hash

    inputs = [f"data.input={data / cfg.generate_from}", f"model.path={base}", "model.from_sft_config=null",
              f"tracking.uri={_uri(cfg)}"]  # fmt: skip
    probe = _stage_config(GenerateJobConfig, cfg.profiles.generate, [*inputs, "output.path=."], cfg, "generate")
    out = Path(cfg.root) / "generate" / generation_hash(probe)
    return _stage_config(GenerateJobConfig, cfg.profiles.generate, [*inputs, f"output.path={out}"], cfg, "generate")


def _plan_train(cfg: PipelineConfig, prefs: Path, base: Path, stage: str, extra: Sequence[str]) -> Any:
    from hscr_platform.training.train_config import TrainJobConfig

    paths = [f"data.path={prefs}", f"policy.path={base}", f"output.root={cfg.root}", "output.name=null",
             f"tracking.uri={_uri(cfg)}", *extra]  # fmt: skip
    return _stage_config(TrainJobConfig, cfg.profiles.train, paths, cfg, stage)


def _plan_evaluate(cfg: PipelineConfig, data: Path, models: dict[str, Path]) -> Any:
    from hscr_platform.evaluation.job import EvaluateJobConfig

    listed = "{" + ", ".join(f"{name}: {path}" for name, path in models.items()) + "}"
    extra = [f"data.path={data / 'test'}", f"models={listed}", f"tracking.uri={_uri(cfg)}"]
    probe = _stage_config(EvaluateJobConfig, cfg.profiles.evaluate, [*extra, "output.path=."], cfg, "evaluate")
    out = Path(cfg.root) / "evaluate" / config_hash(probe)
    return _stage_config(EvaluateJobConfig, cfg.profiles.evaluate, [*extra, f"output.path={out}"], cfg, "evaluate")


def plan(cfg: PipelineConfig) -> Plan:
    """Resolve each stage's config from its profile, the overrides and the upstream stage's output paths."""
    from hscr_platform.training.train_config import run_name

    synthmed, data, sft, base = _plan_data(cfg)
    generate = _plan_generate(cfg, data, base)
    prefs = Path(generate.output.path) / "preferences"
    train = _plan_train(cfg, prefs, base, "train", [])
    dpo = _plan_train(cfg, prefs, base, "dpo", ["loss.weights=dpo", "data.max_levels=2"]) if cfg.dpo_baseline else None
    if cfg.ablation is not None:
        sweeps = _plan_sweeps(cfg, cfg.ablation, prefs, base, data)
        evaluate = _plan_evaluate(cfg, data, {"base": base})  # validated now; the models are added after training
        return Plan(synthmed, data, sft, base, generate, train, None, evaluate, sweeps)
    models = {"base": base, "hscr": Path(cfg.root) / "train" / run_name(train) / "model"}
    if dpo is not None:
        models["dpo"] = Path(cfg.root) / "train" / run_name(dpo) / "model"
    evaluate = _plan_evaluate(cfg, data, models)
    return Plan(synthmed, data, sft, base, generate, train, dpo, evaluate)


def _plan_sweeps(cfg: PipelineConfig, ab: AblationConfig, prefs: Path, base: Path, data: Path) -> dict[str, Any]:
    from hscr_platform.ablation import sweep_config
    from hscr_platform.sweep import train_config

    paths = [*cfg.overrides.get("train", ()), f"data.path={prefs}", f"policy.path={base}",
             f"output.root={cfg.root}", "output.name=null", f"tracking.uri={_uri(cfg)}"]  # fmt: skip
    sweeps = {
        method: sweep_config(
            ab,
            method,
            train_profile=cfg.profiles.train,
            train_paths=paths,
            validation=data / "validation",
            root=str(Path(cfg.root).resolve()),
            tracking_uri=_uri(cfg),
            ray=cfg.ray,
        )
        for method in ab.methods
    }
    for sweep in sweeps.values():  # every method's search space fits the train config, before any work
        train_config(sweep, {dim.key: dim.low for dim in sweep.space})
    return sweeps


def run_synthmed(stages: Plan) -> Path:
    """Generate SynthMed into <root>/synthmed/<hash of the world's config>, unless it is already there."""
    from hscr_platform.data.synthmed.job import run as synthmed_run

    out = stages.synthmed_dir
    if is_complete(out):
        print(f"[pipeline] synthmed: cached {out}")
        return out
    summary = synthmed_run(stages.synthmed)
    mark_complete(out, stages.synthmed, **(summary if isinstance(summary, dict) else {}))
    return out


def run_stages(stages: Plan) -> dict[str, Any]:
    """Every stage in order (each job skips itself when its outputs are complete for the same config)."""
    from hscr_platform.evaluation.job import run as evaluate_run
    from hscr_platform.generation.job import run as generate_run
    from hscr_platform.training.job import run as train_run
    from hscr_platform.training.sft import run as sft_run

    results: dict[str, Any] = {"synthmed": str(run_synthmed(stages))}
    results["sft"] = dict(sft_run(stages.sft))
    print("[pipeline] generate: HSCR preference data", flush=True)
    results["generate"] = generate_run(stages.generate)
    print("[pipeline] train: multi-level DPO (HSCR)", flush=True)
    results["train"] = train_run(stages.train)
    if stages.dpo is not None:
        print("[pipeline] dpo: plain single-pair DPO baseline on the same data", flush=True)
        results["dpo"] = train_run(stages.dpo)
    done = Path(stages.evaluate.output.path) / "results.json"
    if done.is_file():
        print(f"[pipeline] evaluate: cached {done.parent}", flush=True)
        results["evaluate"] = json.loads(done.read_text())
    else:
        print("[pipeline] evaluate: base vs aligned on the balanced test split", flush=True)
        results["evaluate"] = evaluate_run(stages.evaluate)
    return results


def verdict(results: dict[str, Any]) -> list[str]:
    """Plain sentences: did HSCR beat the base model (and plain DPO) on closed accuracy and hallucinations?"""
    per_model = results.get("results") or {}
    base, hscr = per_model.get("base", {}), per_model.get("hscr", {})
    lines = []
    for key, better, label in (("closed_accuracy", 1, "closed accuracy"),
                               ("hallucination_rate", -1, "hallucination rate")):  # fmt: skip
        b, h = base.get(key), hscr.get(key)
        if b is None or h is None:
            continue
        won = (h - b) * better > 0
        line = f"HSCR {'improves' if won else 'does NOT improve'} {label}: base {b:.3f} -> HSCR {h:.3f}"
        d = per_model.get("dpo", {}).get(key)
        lines.append(line + (f" (plain DPO {d:.3f})" if d is not None else ""))
    return lines


def levels_table(generation: dict[str, Any]) -> list[str]:
    """Markdown: per input question type, rows, preference rows, yield and rows with 1, 2, 3, ... levels."""
    per_type = generation.get("by_question_type") or {}
    if not per_type:
        return []
    most = max((int(k) for t in per_type.values() for k in t["num_levels"]), default=1)
    head = ["question type", "rows", "preferences", "yield", *(f"{k} level{'s' * (k > 1)}" for k in range(1, most + 1))]
    lines = ["## Preference data: levels per question type", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for qtype, t in per_type.items():
        counts = [str(t["num_levels"].get(str(k), 0)) for k in range(1, most + 1)]
        lines.append(f"| {qtype} | {t['rows']} | {t['preferences']} | {t['yield']:.3f} | " + " | ".join(counts) + " |")
    return [*lines, ""]


ABLATION_HINT = ("- the seeded ablation (plain DPO, explicit only, implicit only, HSCR, HSCR + NLL, HSCR round 2; "
                 "chosen on validation, 3 seeds, test read once): `python -m jobs.pipeline --config "
                 "jobs/configs/pipeline/ablation.yaml`, about 2 h 20 min on 2 idle CPUs "
                 "(README: The ablation)")  # fmt: skip


def write_report(cfg: PipelineConfig, stages: Plan, results: dict[str, Any], seconds: float) -> Path:
    """<root>/report.md: the comparison table, the verdict, the levels of the data, and where every output is."""
    evaluate_out = Path(stages.evaluate.output.path)
    table = (evaluate_out / "table.md").read_text() if (evaluate_out / "table.md").is_file() else "(no table)"
    lines = ["# HSCR pipeline report", "", *verdict(results.get("evaluate", {})), "", table, "",
             *levels_table(results.get("generate") or {}),
             f"- SynthMed: {stages.synthmed_dir}", f"- base model: {stages.base_model}",
             f"- preferences: {stages.generate.output.path} (reward view: reward_view.html there)",
             f"- evaluation: {evaluate_out}", f"- wall time: {seconds:.0f} s",
             f"- MLflow: `mlflow ui --backend-store-uri {_uri(cfg)}`", ABLATION_HINT]  # fmt: skip
    path = Path(cfg.root) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_inputs(stages: Plan) -> dict[str, Any]:
    """The stages every ablation method shares: SynthMed, the base model, the preference data."""
    from hscr_platform.generation.job import run as generate_run
    from hscr_platform.training.sft import run as sft_run

    results: dict[str, Any] = {"synthmed": str(run_synthmed(stages)), "sft": dict(sft_run(stages.sft))}
    print("[pipeline] generate: HSCR preference data", flush=True)
    results["generate"] = generate_run(stages.generate)
    return results


def run_selection(stages: Plan) -> dict[str, dict[str, Any]]:
    """Ablation, part 1: every method's sweep, scored on validation (the test split is not opened)."""
    from hscr_platform.ablation import select

    assert stages.sweeps is not None
    return select(stages.sweeps)


def run_ablation_test(cfg: PipelineConfig, stages: Plan, chosen: dict[str, dict], results: dict) -> Path:
    """Ablation, part 2: every method × seed trained with its chosen config (and HSCR round 2), all models
    evaluated once on test, report.md written; returns the report's path."""
    import pyarrow.parquet as pq

    from hscr_platform import ablation
    from hscr_platform.evaluation.job import run as evaluate_run

    ab, sweeps = cfg.ablation, stages.sweeps
    assert ab is not None and sweeps is not None
    models = ablation.train_seeds(sweeps, chosen, ab.seeds)
    methods = list(ab.methods)
    if ab.rounds == 2:
        models |= ablation.round_two(sweeps["hscr"], chosen["hscr"], models, ab.seeds, stages.generate)
        methods.append(ablation.ROUND_TWO)
    print(f"[pipeline] evaluate: base + {len(models)} models on the test split (read once)", flush=True)
    evaluate = _plan_evaluate(cfg, stages.synthmed_dir, {"base": stages.base_model, **models})
    results["evaluate"] = evaluate_run(evaluate)
    table = ablation.per_method(results["evaluate"]["results"], methods, ab.seeds)
    records = pq.read_table(Path(evaluate.output.path) / "predictions.parquet",
                            columns=["model", "view", "source", "id", "answer_type", "score"]).to_pylist()  # fmt: skip
    lines = ablation.report_lines(table, chosen, ab.seeds, rows=ablation.row_lines(records, methods, ab.seeds))
    lines += ["", f"- evaluation: {evaluate.output.path}", f"- MLflow: `mlflow ui --backend-store-uri {_uri(cfg)}`"]
    report = Path(cfg.root) / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (Path(cfg.root) / "ablation.json").write_text(json.dumps({"chosen": chosen, "models": models, "table": table},
                                                             indent=2, default=str))  # fmt: skip
    return report


def preflight(cfg: PipelineConfig, stages: Plan) -> None:
    """Everything the stages need from outside the run, checked in one pass before the first stage starts."""
    from hscr_platform.core.preflight import pipeline_checks, require
    from hscr_platform.models.loading import check_vlm_folder

    require(pipeline_checks(cfg, stages, tracking_uri=_uri(cfg), check_model=check_vlm_folder), job="pipeline")


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage in order; print the comparison table, the verdict and where everything is."""
    t0 = time.time()
    stages = plan(cfg)  # a bad key or path in any stage fails here, before any work
    preflight(cfg, stages)  # so does every missing model, input, tracking server or Ray cluster: all listed at once
    if cfg.ablation is not None:
        results = run_inputs(stages)
        report = run_ablation_test(cfg, stages, run_selection(stages), results)
        print("\n" + report.read_text())
        print(f"[pipeline] ablation done in {time.time() - t0:.0f}s; report: {report}")
        return results
    results = run_stages(stages)
    report = write_report(cfg, stages, results, time.time() - t0)
    print("\n" + report.read_text())
    (Path(cfg.root) / "pipeline.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"[pipeline] done in {time.time() - t0:.0f}s; report: {report}")
    return results
