"""Level-weight sweeps (``python -m jobs.sweep``): Ray Tune over the multi-level DPO loss and optimiser.

Each trial is one training run: a Tune function trainable that resolves the train profile + the trial's
dotted overrides into a ``TrainJobConfig`` and runs the training job (which fits a ``TorchTrainer``). While it
trains, the trainer's live metrics reach Tune, and ASHA stops trials whose ``rewards/accuracies`` lag; a trial
that finishes is scored on the validation split (closed accuracy by default), and that score picks the best
config, written out as a YAML that ``jobs.train`` accepts as is. MLflow: one parent run for the sweep, the
trials' training runs as its children. A failing trial is recorded and does not end the sweep. Trials run as
many at a time as the cluster holds with every trial's Train workers placed (at most max_concurrent_trials); a
trial that could never be placed stops the sweep before it starts (``concurrent_trials``).
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
    max_concurrent_trials: int = 1  # lowered (with a message) to what the cluster holds, workers placed
    seed: int = 0
    # the trial's own driver (its Train workers hold their own); 0: it only waits (2 × 1-CPU workers on 2 CPUs)
    trial_cpus: float = 0.0
    placement_timeout_s: float = 600.0  # a trial whose workers' CPUs / GPUs are not free by then fails
    # ASHA stops trials whose training metric lags; false: every trial runs to the end (FIFO), which a sweep
    # scored on a validation metric that the training metric does not predict needs (the ablation)
    early_stopping: bool = True
    asha_metric: str = "rewards/accuracies"  # reported by the trainer every schedule.log_every steps
    asha_grace_period: int = 2  # reports before ASHA may stop a trial
    asha_reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be >= 1")
        if self.trial_cpus < 0 or self.placement_timeout_s <= 0:
            raise ValueError("trial_cpus must be >= 0 and placement_timeout_s > 0")


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


# --- resources: what one trial holds, how many fit ------------------------------------------------------

TRIAL_MEMORY_BYTES = 64 * 2**20  # a token reservation, so a trial that holds no CPU still has a resource request


def worker_resources(train: Any) -> dict[str, float]:
    """What a trial's Ray Train workers hold together: num_workers × (cpus_per_worker, 1 GPU if use_gpu)."""
    workers = train.workers
    need = {"CPU": workers.num_workers * workers.cpus_per_worker}
    if workers.use_gpu:
        need["GPU"] = float(workers.num_workers)
    return need


def trial_resources(cfg: SweepJobConfig, train: Any) -> dict[str, float]:
    """Everything one running trial holds: its own driver (``search.trial_cpus``) plus its Train workers."""
    need = worker_resources(train)
    need["CPU"] += cfg.search.trial_cpus
    return need


def concurrent_trials(cfg: SweepJobConfig, train: Any, cluster: dict[str, float]) -> int:
    """How many trials run at once: ``search.max_concurrent_trials``, lowered to what ``cluster`` holds with
    every running trial's workers placed. Raises ValueError when not even one trial fits: its Train workers
    could never start, and Ray Train would retry their start-up forever."""
    need = trial_resources(cfg, train)
    fits = min(int(cluster.get(k, 0.0) / v + 1e-9) if v else 10**9 for k, v in need.items())
    if fits < 1:
        shape = (f"search.trial_cpus {cfg.search.trial_cpus} + workers.num_workers {train.workers.num_workers}"
                 f" × workers.cpus_per_worker {train.workers.cpus_per_worker}")  # fmt: skip
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ValueError(
            f"a sweep trial needs {need} ({shape}) but the Ray cluster has {have}: its Train "
            "workers could never start. Lower search.trial_cpus (0 works) or the workers' CPUs."
        )
    return min(cfg.search.max_concurrent_trials, fits)


def wait_for_workers(need: dict[str, float], *, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until ``need`` is free in the cluster, or raise TimeoutError naming it: a trial fails instead of
    its trainer retrying the worker-group start-up without end."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
            return
        if time.monotonic() >= deadline:
            have = {k: round(free.get(k, 0.0), 3) for k in need}
            raise TimeoutError(f"the trial's Train workers need {need}, free after {timeout_s:.0f} s: {have} "
                               "(search.placement_timeout_s)")  # fmt: skip
        time.sleep(poll_s)


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

    from hscr_platform.models.answering import evaluate_folder_cached
    from hscr_platform.training.job import run as train_run

    base = train_config(sweep, params)
    wait_for_workers(worker_resources(base), timeout_s=sweep.search.placement_timeout_s)
    name = f"{sweep.name}-trial-{config_hash(base)}"
    tracking = dataclasses.replace(sweep.tracking, parent_run_id=parent_run_id)
    output = dataclasses.replace(base.output, root=str(Path(sweep.output_root).resolve()), name=name)
    summary = train_run(dataclasses.replace(base, tracking=tracking, output=output), callbacks=[_tune_callback()])
    obj = sweep.objective
    report = evaluate_folder_cached(summary["model"], obj.validation, samples=obj.samples,
                                    batch_size=obj.batch_size, max_new_tokens=obj.max_new_tokens)  # fmt: skip
    score = report["metrics"].get(obj.metric)
    final = {k: v for k, v in summary.get("final", {}).items() if isinstance(v, int | float)}
    tune.report({**final, "val_score": float("nan") if score is None else score, "trial_name": name})


# --- the driver -----------------------------------------------------------------------------------------


def scheduler(search: SearchConfig) -> Any:
    """ASHA on ``asha_metric`` (higher is better), or FIFO (every trial runs to the end) without early stopping."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not search.early_stopping:
        return FIFOScheduler()
    return ASHAScheduler(metric=search.asha_metric, mode="max", time_attr="training_iteration",
                         grace_period=search.asha_grace_period,
                         reduction_factor=search.asha_reduction_factor)  # fmt: skip


def _tuner(cfg: SweepJobConfig, out: Path, parent_run_id: str | None, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_parameters(run_trial, sweep=cfg, parent_run_id=parent_run_id, cwd=str(Path.cwd()))
    search = cfg.search
    return tune.Tuner(
        tune.with_resources(trainable, {"CPU": search.trial_cpus, "memory": TRIAL_MEMORY_BYTES}),
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            num_samples=search.num_samples,
            reuse_actors=False,  # a stopped trial's actor must die: its Ray Train workers go with it
            # the limit lives in the generator: Tune ignores max_concurrent_trials beside a BasicVariantGenerator
            search_alg=BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrent),
            scheduler=scheduler(search),
        ),
        run_config=tune.RunConfig(name=out.name, storage_path=str((out / "ray").resolve())),
    )


def trial_rows(results: Any, cfg: SweepJobConfig) -> list[dict[str, Any]]:
    """One row per trial: the sampled values, the validation score, how it ended, and when it ran (epoch s)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        score = metrics.get("val_score")
        status = "error" if result.error else ("finished" if score is not None else "stopped early")
        params = {d.key: (result.config or {}).get(d.key) for d in cfg.space}
        end, seconds = metrics.get("timestamp"), metrics.get("time_total_s")  # its last report; time it ran
        rows.append({"params": params, "val_score": score, "status": status,
                     "error": str(result.error)[-500:] if result.error else None,
                     "trial_name": metrics.get("trial_name"),
                     "window": [end - seconds, end] if end and seconds else None})  # fmt: skip
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
    from hscr_platform.core.tracking import (
        end_run,
        kill_running_children,
        log_artifacts,
        log_config,
        log_metric,
        start_run,
        tracking_uri,
    )

    check_space(cfg)  # before any Ray work
    out = Path(cfg.output_root) / "sweep" / f"{cfg.name}-{config_hash(cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking, Path(cfg.output_root).resolve())
    parent = start_run(uri=uri, experiment=cfg.tracking.experiment, run_name=out.name, tags={"job": "sweep"})
    log_config(parent, cfg)
    print(f"[sweep] mlflow parent run {parent.run_id} ({uri})", flush=True)
    init_ray(cfg.ray)
    concurrent = _concurrency(cfg, parent)
    rows = trial_rows(_tuner(cfg, out, parent.run_id, concurrent).fit(), cfg)
    best = best_row(rows)
    table = _markdown(rows, cfg.objective.metric)
    (out / "trials.md").write_text(table + "\n")
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    files = [out / "trials.md", out / "trials.json"]
    if best is not None:
        files.append(save_config(train_config(cfg, best["params"]), out / "best.yaml"))
        log_metric(parent, "best_val_score", best["val_score"])
    for path in files:
        log_artifacts(parent, path)
    kill_running_children(parent)  # trials that ASHA stopped were killed mid-run
    end_run(parent, "FINISHED" if best is not None else "FAILED")
    print(table)
    print(f"[sweep] best {cfg.objective.metric}: {best and best['val_score']}; config: {out / 'best.yaml'}")
    print(f"[sweep] train it: python -m jobs.train --config {out / 'best.yaml'}")
    return {"out": str(out), "parent_run_id": parent.run_id, "best": best, "trials": rows}


def _concurrency(cfg: SweepJobConfig, parent: Any) -> int:
    """Trials at a time for this cluster (a trial that can never be placed ends the sweep here, clearly)."""
    import ray

    from hscr_platform.core.tracking import end_run

    train = train_config(cfg, {d.key: _midpoint(d) for d in cfg.space})
    try:
        concurrent = concurrent_trials(cfg, train, ray.cluster_resources())
    except ValueError:
        end_run(parent, "FAILED")
        raise
    need = trial_resources(cfg, train)
    note = "" if concurrent == cfg.search.max_concurrent_trials else \
        f" (max_concurrent_trials {cfg.search.max_concurrent_trials} lowered: that many never fit at once)"  # fmt: skip
    print(f"[sweep] {concurrent} trial(s) at a time, each holding {need}{note}", flush=True)
    return concurrent
