"""Level-weight sweeps (``python -m jobs.sweep``): Ray Tune over the multi-level DPO loss and optimiser.

Each trial is one training run: a Tune function trainable that resolves the train profile + the trial's
dotted overrides into a ``TrainJobConfig`` and runs the training job (which fits a ``TorchTrainer``). While it
trains, the trainer's live metrics reach Tune, and ASHA stops trials whose ``rewards/accuracies`` lag; a trial
that finishes is scored on the validation split (closed accuracy by default), and that score picks the best
config, written out as a YAML that ``jobs.train`` accepts as is. MLflow: one parent run for the sweep, the
trials' training runs as its children. A failing trial is recorded and does not end the sweep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.core.config import ConfigError, config_hash, load_config, save_config
from hscr_platform.core.runtime import RayConfig
from hscr_platform.core.tracking import TrackingConfig


@dataclass(frozen=True, kw_only=True)
class Dimension:
    """One searched train-config key: ``loss.gamma``, ``optim.lr``, ``loss.explicit`` (a vector: ``size``)."""

    key: str
    kind: Literal["uniform", "loguniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()  # kind: choice
    size: int | None = None  # sample a list of this many values (per-level weights), each from low..high

    def __post_init__(self) -> None:
        if self.kind == "choice":
            if not self.values:
                raise ValueError(f"{self.key}: kind 'choice' needs values")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.key}: needs low < high, got low={self.low} high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"{self.key}: loguniform needs low > 0, got {self.low}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"{self.key}: size must be >= 1")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    num_samples: int = 4  # trials
    max_concurrent_trials: int = 1  # each trial's Ray Train workers need their CPUs: 1 on a 2-CPU machine
    seed: int = 0
    trial_cpus: float = 0.25  # the trial's own driver (the Ray Train workers request their own)
    asha_metric: str = "rewards/accuracies"  # reported by the trainer every schedule.log_every steps
    asha_grace_period: int = 2  # reports before ASHA may stop a trial
    asha_reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    validation: str  # sample shards to score each finished trial on (e.g. <synthmed>/validation)
    metric: Literal["closed_accuracy", "open_recall", "presence_accuracy"] = "closed_accuracy"
    samples: int = 400  # validation rows answered per trial
    batch_size: int = 64
    max_new_tokens: int = 24


@dataclass(frozen=True, kw_only=True)
class SweepJobConfig:
    """A Ray Tune sweep over multi-level DPO training runs, tracked in MLflow."""

    train_profile: str  # the jobs.train YAML each trial starts from
    train_overrides: tuple[str, ...] = ()  # applied to every trial (e.g. data.path=..., policy.path=...)
    space: tuple[Dimension, ...]
    search: SearchConfig = field(default_factory=SearchConfig)
    objective: ObjectiveConfig
    name: str = "sweep"  # the MLflow parent run and the folder <output_root>/sweep/<name>-<hash>
    output_root: str = "runs"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="hscr-sweep"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("space: at least one dimension to search")
        keys = [d.key for d in self.space]
        if len(set(keys)) != len(keys):
            raise ValueError(f"space: a key appears twice: {keys}")


# --- the search space -----------------------------------------------------------------------------------


def _midpoint(dim: Dimension) -> Any:
    if dim.kind == "choice":
        return dim.values[0]
    assert dim.low is not None and dim.high is not None
    mid = math.sqrt(dim.low * dim.high) if dim.kind == "loguniform" else (dim.low + dim.high) / 2
    return [mid] * dim.size if dim.size else mid


def trial_overrides(cfg: SweepJobConfig, params: dict[str, Any]) -> list[str]:
    """The dotted ``key=value`` overrides of one trial (sampled values serialised as YAML flow values)."""
    import yaml

    sampled = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in params.items()]
    return [*cfg.train_overrides, *(s.removesuffix("\n...") for s in sampled)]


def train_config(cfg: SweepJobConfig, params: dict[str, Any]) -> Any:
    """The trial's TrainJobConfig: the profile + the sweep's overrides + the sampled values."""
    from hscr_platform.training.train_config import TrainJobConfig

    return load_config(TrainJobConfig, cfg.train_profile, trial_overrides(cfg, params))


def check_space(cfg: SweepJobConfig) -> None:
    """Fail before any Ray work if a dimension's key or value type does not fit the train config."""
    if not Path(cfg.train_profile).is_file():
        raise FileNotFoundError(f"train_profile {cfg.train_profile} does not exist")
    try:
        train_config(cfg, {d.key: _midpoint(d) for d in cfg.space})
    except ConfigError as exc:
        raise ConfigError(f"search space does not fit {cfg.train_profile}: {exc}") from None
    if not Path(cfg.objective.validation).is_dir():
        raise FileNotFoundError(f"objective.validation: {cfg.objective.validation} does not exist")


def param_space(cfg: SweepJobConfig) -> dict[str, Any]:
    """Tune's sampling domains (random search: Tune's BasicVariantGenerator samples them)."""
    from ray import tune

    def domain(dim: Dimension) -> Any:
        if dim.kind == "choice":
            return tune.choice(list(dim.values))
        assert dim.low is not None and dim.high is not None  # checked in Dimension.__post_init__
        sample = tune.loguniform if dim.kind == "loguniform" else tune.uniform
        scalar = sample(dim.low, dim.high)
        if not dim.size:
            return scalar
        return tune.sample_from(_vector_sampler(scalar, dim.size))

    return {d.key: domain(d) for d in cfg.space}


def _vector_sampler(scalar: Any, size: int) -> Any:
    """A Tune sample_from function drawing ``size`` independent values from one domain."""

    def draw(_spec: Any) -> list[float]:
        return [float(scalar.sample()) for _ in range(size)]

    return draw


# --- one trial ------------------------------------------------------------------------------------------


def _tune_callback() -> Any:
    """Forward the trainer's reports to Tune, with the newest history record's numbers at the top level."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FlatReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            history = metrics[0].get("history") or [{}]
            flat = {k: v for k, v in history[-1].items() if isinstance(v, int | float)}
            self._training_actor_item_queue.put({"step": metrics[0].get("step", 0), **flat})

    return FlatReport()


def run_trial(params: dict[str, Any], *, sweep: SweepJobConfig, parent_run_id: str | None, cwd: str) -> None:
    """Tune function trainable: train with the sampled values, then report the validation score.

    Trials run in their own directory; relative paths in the configs mean the driver's working directory.
    """
    import os

    from ray import tune

    os.chdir(cwd)

    from hscr_platform.models.answering import evaluate_folder
    from hscr_platform.training.job import run as train_run

    base = train_config(sweep, params)
    name = f"{sweep.name}-trial-{config_hash(base)}"
    tracking = dataclasses.replace(sweep.tracking, parent_run_id=parent_run_id)
    output = dataclasses.replace(base.output, root=str(Path(sweep.output_root).resolve()), name=name)
    summary = train_run(dataclasses.replace(base, tracking=tracking, output=output), callbacks=[_tune_callback()])
    obj = sweep.objective
    report = evaluate_folder(summary["model"], obj.validation, samples=obj.samples,
                             batch_size=obj.batch_size, max_new_tokens=obj.max_new_tokens)  # fmt: skip
    score = report["metrics"].get(obj.metric)
    final = {k: v for k, v in summary.get("final", {}).items() if isinstance(v, int | float)}
    tune.report({**final, "val_score": float("nan") if score is None else score, "trial_name": name})


# --- the driver -----------------------------------------------------------------------------------------


def _tuner(cfg: SweepJobConfig, out: Path, parent_run_id: str | None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_parameters(run_trial, sweep=cfg, parent_run_id=parent_run_id, cwd=str(Path.cwd()))
    search = cfg.search
    return tune.Tuner(
        tune.with_resources(trainable, {"CPU": search.trial_cpus}),
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
            reuse_actors=False,  # a stopped trial's actor must die: its Ray Train workers go with it
            search_alg=BasicVariantGenerator(random_state=search.seed),
            scheduler=ASHAScheduler(
                metric=search.asha_metric,
                mode="max",
                time_attr="training_iteration",
                grace_period=search.asha_grace_period,
                reduction_factor=search.asha_reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name=out.name, storage_path=str((out / "ray").resolve())),
    )


def trial_rows(results: Any, cfg: SweepJobConfig) -> list[dict[str, Any]]:
    """One row per trial: the sampled values, the validation score, and how it ended."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        score = metrics.get("val_score")
        status = "error" if result.error else ("finished" if score is not None else "stopped early")
        params = {d.key: (result.config or {}).get(d.key) for d in cfg.space}
        rows.append({"params": params, "val_score": score, "status": status,
                     "error": str(result.error)[-500:] if result.error else None,
                     "trial_name": metrics.get("trial_name")})  # fmt: skip
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r["val_score"], float) and not math.isnan(r["val_score"])]
    return max(scored, key=lambda r: r["val_score"]) if scored else None


def _markdown(rows: list[dict[str, Any]], metric: str) -> str:
    keys = list(rows[0]["params"]) if rows else []
    lines = [f"| trial | {' | '.join(keys)} | {metric} | status |", "|---" * (len(keys) + 3) + "|"]
    for i, row in enumerate(rows):
        values = " | ".join(_fmt(row["params"][k]) for k in keys)
        lines.append(f"| {i} | {values} | {_fmt(row['val_score'])} | {row['status']} |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def run(cfg: SweepJobConfig) -> dict[str, Any]:
    """Validate the space, open the parent run, run the trials, write the best config."""
    import json

    from hscr_platform.core.runtime import init_ray
    from hscr_platform.core.tracking import end_run, log_artifacts, log_config, start_run, tracking_uri

    check_space(cfg)  # before any Ray work
    out = Path(cfg.output_root) / "sweep" / f"{cfg.name}-{config_hash(cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking, Path(cfg.output_root).resolve())
    parent = start_run(uri=uri, experiment=cfg.tracking.experiment, run_name=out.name, tags={"job": "sweep"})
    log_config(parent, cfg)
    print(f"[sweep] mlflow parent run {parent.run_id} ({uri})", flush=True)
    init_ray(cfg.ray)
    rows = trial_rows(_tuner(cfg, out, parent.run_id).fit(), cfg)
    best = best_row(rows)
    table = _markdown(rows, cfg.objective.metric)
    (out / "trials.md").write_text(table + "\n")
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    files = [out / "trials.md", out / "trials.json"]
    if best is not None:
        files.append(save_config(train_config(cfg, best["params"]), out / "best.yaml"))
        _client_metric(parent, "best_val_score", best["val_score"])
    for path in files:
        log_artifacts(parent, path)
    _close_stopped_children(parent)
    end_run(parent, "FINISHED" if best is not None else "FAILED")
    print(table)
    print(f"[sweep] best {cfg.objective.metric}: {best and best['val_score']}; config: {out / 'best.yaml'}")
    print(f"[sweep] train it: python -m jobs.train --config {out / 'best.yaml'}")
    return {"out": str(out), "parent_run_id": parent.run_id, "best": best, "trials": rows}


def _client_metric(run: Any, key: str, value: float) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(run.uri).log_metric(run.run_id, key, value)


def _close_stopped_children(parent: Any) -> None:
    """Trials that ASHA stopped were killed mid-run: mark their still-RUNNING MLflow runs KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.uri)
    query = f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
    for child in client.search_runs([parent.experiment_id], filter_string=query):
        client.set_terminated(child.info.run_id, status="KILLED")
