"""A 4-trial Ray Tune sweep of tiny multi-level DPO runs: MLflow parent + children, a best config that
jobs.train accepts; a bad search space fails before any Ray work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    from hscr_platform.training.toy_prefs import toy_preference_rows, write_preference_shards

    root = tmp_path_factory.mktemp("sweep")
    shards = write_preference_shards(toy_preference_rows(tiny_model_dir, 24, seed=2), root / "pref")
    synth = root / "synthmed"
    subprocess.run([sys.executable, "-m", "jobs.synthmed", "--config", "jobs/configs/synthmed/tiny.yaml",
                    f"output.path={synth}"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return root, shards, synth / "validation"


def _sweep(root: Path, shards: Path, validation: Path, tiny_model_dir: Path, *extra: str):
    overrides = f'train_overrides=["loss.weights=custom", "schedule.max_steps=4", "schedule.log_every=1", ' \
                f'"data.path={shards}", "policy.path={tiny_model_dir}"]'  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", "jobs/configs/sweep/tiny.yaml", overrides,
           f"objective.validation={validation}", f"output_root={root}", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def swept(inputs, tiny_model_dir):
    root, shards, validation = inputs
    proc = _sweep(root, shards, validation, tiny_model_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (out,) = (root / "sweep").iterdir()
    return root, out, proc


def test_four_trials_with_scores_and_a_best_config(swept):
    _, out, proc = swept
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 4
    assert {tuple(sorted(r["params"])) for r in rows} == {("loss.explicit", "loss.gamma", "loss.implicit", "optim.lr")}
    assert all(len(r["params"]["loss.explicit"]) == 3 for r in rows)
    assert len({json.dumps(r["params"]) for r in rows}) == 4  # random search: four different points
    assert any(r["status"] == "finished" for r in rows)
    assert "best closed_accuracy" in proc.stdout


def test_best_config_loads_as_a_train_config(swept):
    from hscr_platform.core.config import load_config
    from hscr_platform.training.train_config import TrainJobConfig

    _, out, _ = swept
    cfg = load_config(TrainJobConfig, out / "best.yaml")
    assert cfg.loss.weights == "custom" and len(cfg.loss.explicit) == 3


def test_mlflow_parent_with_child_trial_runs(swept):
    from mlflow.tracking import MlflowClient

    root, _, proc = swept
    parent_id = next(ln.split()[4] for ln in proc.stdout.splitlines() if "mlflow parent run" in ln)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert "best_val_score" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) >= 1 and all(c.data.params.get("loss.weights") == "custom" for c in children)
    assert all(c.info.status in ("FINISHED", "KILLED", "FAILED") for c in children)  # none left RUNNING


def test_invalid_search_space_fails_before_ray(inputs, tiny_model_dir):
    root, shards, validation = inputs
    proc = _sweep(root / "bad", shards, validation, tiny_model_dir,
                  'space=[{key: loss.gammma, kind: uniform, low: 0.1, high: 0.2}]')  # fmt: skip
    assert proc.returncode == 2 and "loss.gammma" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
