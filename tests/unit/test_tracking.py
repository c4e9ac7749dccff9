"""MLflow tracking: SQLite default store, deterministic re-attachment, params, idempotent metric history."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hscr_platform.core.tracking import (
    TrackingConfig,
    end_run,
    find_run,
    log_artifacts,
    log_config,
    log_metrics_history,
    metric_records,
    start_run,
    tracking_uri,
)


@dataclass(frozen=True, kw_only=True)
class _Inner:
    lr: float = 1e-3
    names: tuple[str, ...] = ("a", "b")


@dataclass(frozen=True, kw_only=True)
class _Cfg:
    inner: _Inner = field(default_factory=_Inner)
    seed: int = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return folder, tracking_uri(TrackingConfig(), folder)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_default_uri_is_sqlite_in_run_dir(tmp_path):
    assert tracking_uri(TrackingConfig(), tmp_path / "runs") == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert tracking_uri(TrackingConfig(uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"


def test_start_run_reattaches_by_name_and_logs_params_once(store):
    uri = store[1]
    first = start_run(uri=uri, experiment="exp", run_name="train-abc", tags={"job": "train"})
    log_config(first, _Cfg())
    end_run(first, "KILLED")
    again = start_run(uri=uri, experiment="exp", run_name="train-abc")
    assert again.run_id == first.run_id and again.resumed and not first.resumed
    log_config(again, _Cfg(seed=4))  # a resumed run keeps its params (MLflow refuses to change them)
    run = _client(uri).get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["job"] == "train"
    assert run.data.params == {"inner.lr": "0.001", "inner.names": "['a', 'b']", "seed": "3"}
    other = start_run(uri=uri, experiment="exp", run_name="train-other")
    assert other.run_id != first.run_id and find_run(uri, "exp", "missing") is None


def test_metrics_history_is_idempotent(store):
    uri = store[1]
    run = start_run(uri=uri, experiment="exp", run_name="history")
    records = [{"step": s, "epoch": 0, "loss": 1.0 / (s + 1), "rewards/margins": float(s)} for s in range(3)]
    assert log_metrics_history(run, records[:2]) == 4
    assert log_metrics_history(run, records) == 2  # only step 2 is new
    assert log_metrics_history(run, records) == 0
    history = _client(uri).get_metric_history(run.run_id, "rewards/margins")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert "epoch" not in _client(uri).get_run(run.run_id).data.metrics


def test_metric_records_drop_non_finite_and_non_numbers():
    recs = metric_records(
        [{"step": 1, "loss": float("nan"), "ok": 2, "flag": True, "name": "x"}], step_key="step", after=-1
    )
    assert [(m.key, m.value, m.step) for m in recs] == [("ok", 2.0, 1)]


def test_artifacts_and_config_land_beside_the_database(store, tmp_path):
    folder, uri = store
    run = start_run(uri=uri, experiment="exp", run_name="artifacts")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    log_artifacts(run, tmp_path / "model", "model")
    log_config(run, _Cfg())
    names = {f.path for f in _client(uri).list_artifacts(run.run_id)}
    assert names == {"model", "config.yaml"}
    assert (folder / "mlartifacts").is_dir()


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_end_run_status(store, status):
    uri = store[1]
    run = start_run(uri=uri, experiment="exp", run_name=f"end-{status}")
    end_run(run, status)
    assert _client(uri).get_run(run.run_id).info.status == status
