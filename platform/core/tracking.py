"""Experiment tracking with MLflow, for every job: one owner per run (a job's driver, a sweep, a Tune trial).

Workers never open runs: they report metrics (``ray.train.report`` or a metrics file); the owner logs them.
The default store is a SQLite file in the project's run directory (``sqlite:///<runs>/mlflow.db``, artifacts
beside it in ``mlartifacts/``), so nothing needs a server; ``tracking.uri`` points at a real MLflow server on
a cluster. Runs are found again by their deterministic name, so a restarted job re-attaches to its run.

    run = start_run(uri=tracking_uri(cfg.tracking, "runs"), experiment="hscr-train", run_name="train-ab12")
    log_config(run, cfg); log_metrics_history(run, records); log_artifacts(run, "runs/x/model", "model")
    end_run(run)
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# MLflow reads these when it is imported; a user's own setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
METRIC_BATCH = 1000  # and of metrics
PARAM_MAX_CHARS = 6000
NON_METRIC_KEYS = frozenset({"step", "epoch", "phase"})


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # null: sqlite:///<output root>/mlflow.db; or e.g. http://mlflow:5000
    experiment: str = "hscr"
    log_model: bool = True  # copy the final model folder into the run's artifacts
    parent_run_id: str | None = None  # make this run a child (e.g. a sweep's trial runs under the sweep's run)


@dataclass(frozen=True)
class TrackedRun:
    """A handle that pickles (to a Ray actor or a Tune trial): the store and the run's id."""

    uri: str
    run_id: str
    experiment_id: str
    resumed: bool  # True when an existing run of the same name was re-attached


def tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """The configured URI, or a SQLite store in ``run_dir`` (created if needed)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):  # set by the cluster manifests (from a Secret)
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(run_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go next to the database (MLflow's default is the current directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing."""
    client = _client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=_artifact_location(uri)))


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the newest run called ``run_name`` in the experiment, if any."""
    client = _client(uri)
    runs = client.search_runs(
        [experiment_id(uri, experiment)],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def start_run(
    *,
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> TrackedRun:
    """Open run ``run_name``: re-attach to (and mark RUNNING) an existing one of that name, or create it."""
    client, exp_id = _client(uri), experiment_id(uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = find_run(uri, experiment, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
        return TrackedRun(uri, run_id, exp_id, resumed=True)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return TrackedRun(uri, str(run.info.run_id), exp_id, resumed=False)


def log_params(run: TrackedRun, params: Mapping[str, Any]) -> None:
    """Log params in MLflow-sized batches (values as text, cut at MLflow's length limit)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), PARAM_BATCH):
        _client(run.uri).log_batch(run.run_id, params=items[start : start + PARAM_BATCH])


def log_config(run: TrackedRun, cfg: Any, *, params: bool = True) -> None:
    """The flattened config as params (only on a new run: MLflow params never change) + ``config.yaml``."""
    from hscr_platform.core.config import flatten, save_config

    if params and not run.resumed:
        log_params(run, flatten(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        _client(run.uri).log_artifact(run.run_id, str(save_config(cfg, Path(tmp) / "config.yaml")))


def last_logged_step(run: TrackedRun, key: str) -> int:
    """The largest step logged for metric ``key`` (-1 when none)."""
    history = _client(run.uri).get_metric_history(run.run_id, key)
    return max((m.step for m in history), default=-1)


def metric_records(records: Iterable[Mapping[str, Any]], *, step_key: str, after: int) -> list[Any]:
    """MLflow Metric objects for every finite number in records with ``record[step_key] > after``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for rec in records:
        step = int(rec[step_key])
        if step <= after:
            continue
        for key, value in rec.items():
            if key not in NON_METRIC_KEYS and _is_number(value) and math.isfinite(value):
                out.append(Metric(key, float(value), now, step))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_metrics_history(
    run: TrackedRun, records: Iterable[Mapping[str, Any]], *, step_key: str = "step", key: str = "loss"
) -> int:
    """Log per-step records (``{"step": 3, "loss": 0.6, ...}``), skipping steps already logged for ``key``.

    Idempotent: a re-attached run or a repeated call logs only the new steps. Returns the metrics logged.
    """
    metrics = metric_records(records, step_key=step_key, after=last_logged_step(run, key))
    for start in range(0, len(metrics), METRIC_BATCH):
        _client(run.uri).log_batch(run.run_id, metrics=metrics[start : start + METRIC_BATCH])
    return len(metrics)


def log_artifacts(run: TrackedRun, path: str | Path, artifact_path: str | None = None) -> None:
    """A file or a whole folder into the run's artifacts."""
    path = Path(path)
    if path.is_dir():
        _client(run.uri).log_artifacts(run.run_id, str(path), artifact_path)
    else:
        _client(run.uri).log_artifact(run.run_id, str(path), artifact_path)


def set_tags(run: TrackedRun, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        _client(run.uri).set_tag(run.run_id, key, str(value))


def log_metric(run: TrackedRun, key: str, value: float) -> None:
    """One metric on a run the caller does not hold open (e.g. a sweep's parent after its trials)."""
    _client(run.uri).log_metric(run.run_id, key, value)


def kill_running_children(parent: TrackedRun) -> None:
    """Mark the parent's child runs that are still RUNNING as KILLED (their owners died mid-run)."""
    client = _client(parent.uri)
    query = f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
    for child in client.search_runs([parent.experiment_id], filter_string=query):
        client.set_terminated(child.info.run_id, status="KILLED")


def end_run(run: TrackedRun, status: str = "FINISHED") -> None:
    """FINISHED, FAILED or KILLED (a run stopped on purpose, to be resumed)."""
    _client(run.uri).set_terminated(run.run_id, status=status)


def ray_train_callback(run: TrackedRun, *, history_key: str = "history") -> Any:
    """A Ray Train ``UserCallback`` that logs rank 0's reported ``metrics[history_key]`` records live.

    It runs in the Train controller (on the driver's node), never in a worker; a logging error is printed,
    not raised, so tracking never kills a training run.
    """
    from ray.train import UserCallback

    class _MlflowHistory(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            records = metrics[0].get(history_key) if metrics else None
            if not records:
                return
            try:
                log_metrics_history(run, records)
            except Exception as exc:  # a tracking outage must not stop training
                print(f"[tracking] could not log metrics to {run.uri}: {exc}", flush=True)

    return _MlflowHistory()
