"""The evaluation job end to end on a private local Ray (2 CPUs): two tiny models answer 24 SynthMed test rows
on Ray Data (with the image and blanked), the comparison table, JSON, plots, predictions and the MLflow run
exist; bad inputs (a missing dataset, a folder that is not a VLM) fail with exit code 2 before Ray work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hscr_platform.core.cli import job_main
from hscr_platform.core.config import load_config
from hscr_platform.evaluation.job import EvaluateJobConfig, passes, run

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "evaluate" / "tiny.yaml"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def synth_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthMed's tiny profile (40 balanced test rows), made by its job."""
    out = tmp_path_factory.mktemp("synthmed") / "data"
    cmd = [
        sys.executable,
        "-m",
        "jobs.synthmed",
        "--config",
        "jobs/configs/synthmed/tiny.yaml",
        f"output.path={out}",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return out / "test"


@pytest.fixture(scope="module")
def two_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    copy = tmp_path_factory.mktemp("models") / "copy"
    shutil.copytree(tiny_model_dir, copy)
    return {"base": str(tiny_model_dir), "aligned": str(copy)}


def _models_override(models: dict[str, str]) -> str:
    return "models={" + ", ".join(f"{k}: '{v}'" for k, v in models.items()) + "}"


def test_two_models_end_to_end(ray_local, synth_test, two_models, tmp_path):
    out = tmp_path / "eval" / "run"
    cfg = load_config(EvaluateJobConfig, TINY, [f"data.path={synth_test}", _models_override(two_models),
                                                f"output.path={out}"])  # fmt: skip
    summary = run(cfg)

    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == 24 and list(results["results"]) == ["base", "aligned"]
    base, aligned = results["results"]["base"], results["results"]["aligned"]
    for key in (
        "closed_accuracy",
        "open_recall",
        "presence_yes_rate",
        "report_bleu",
        "reliance_gap_closed_accuracy",
    ):
        assert key in base and base[key] == aligned[key]  # the same weights answer the same
    assert base["per_source"]["synthmed"]["n"] == 24 and "hallucinated_answer_rate" in base
    assert set(results["blank_image"]) == {"base", "aligned"}

    table = (out / "table.md").read_text()
    assert "| metric | base | aligned |" in table and "## Per question type" in table
    for png in ("per_type.png", "presence_yes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(preds) == 2 * 2 * 24  # models x views x rows
    questions = {r["id"]: r["question"] for r in pq.read_table(synth_test, columns=["id", "question"]).to_pylist()}
    assert all(p["question"] == questions[p["id"]] for p in preds)  # joined back to the right rows

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent.resolve() / 'mlflow.db'}")
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["engine"] == "hf"
    assert mlrun.data.metrics["aligned.n"] == 24.0 and "base.closed_accuracy" in mlrun.data.metrics
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    want = {
        "table.md",
        "results.json",
        "per_type.png",
        "presence_yes.png",
        "predictions.parquet",
        "config.yaml",
    }
    assert want <= artifacts


def test_missing_dataset_exits_2_naming_it(tmp_path, two_models):
    missing = tmp_path / "no_such_data"
    cmd = [sys.executable, "-m", "jobs.evaluate", "--config", str(TINY), f"data.path={missing}",
           _models_override(two_models), f"output.path={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"data.path: {missing} does not exist" in proc.stderr
    assert "Ray instance" not in proc.stderr and not (tmp_path / "out").exists()


def test_non_vlm_model_exits_2_before_ray(tmp_path, synth_test, tiny_model_dir, monkeypatch, capsys):
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (text_only / "model.safetensors").write_bytes(b"")
    import hscr_platform.evaluation.job as job

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(job, "init_ray", no_ray)
    argv = ["--config", str(TINY), f"data.path={synth_test}", f"output.path={tmp_path / 'out'}",
            _models_override({"base": str(tiny_model_dir), "text": str(text_only)})]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        job_main(EvaluateJobConfig, job.run, prog="jobs.evaluate", argv=argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    assert f"models.text: {text_only} is not a vision-language model (config.json has no vision_config)" in err


def test_passes_group_models_as_configured(two_models):
    cfg = load_config(EvaluateJobConfig, TINY, [_models_override(two_models)])
    assert [list(g) for g in passes(cfg, cfg.models, cpus=2.0)] == [["base", "aligned"]]
    one_by_one = load_config(EvaluateJobConfig, TINY, [_models_override(two_models), "actors.models_together=false"])
    assert [list(g) for g in passes(one_by_one, one_by_one.models, cpus=2.0)] == [["base"], ["aligned"]]
    # together, as many pools as the CPUs place: 7 models of 0.75 CPU on 2 CPUs -> 2, 2, 2, 1 (all 7 at once hung)
    seven = load_config(EvaluateJobConfig, TINY, [
        "models={" + ", ".join(f"m{i}: '{two_models['base']}'" for i in range(7)) + "}",
        "actors.models_together=true", "actors.num_actors=1", "actors.cpus_per_actor=0.75"])  # fmt: skip
    assert [len(g) for g in passes(seven, seven.models, cpus=2.0)] == [2, 2, 2, 1]
    assert [len(g) for g in passes(seven, seven.models, cpus=0.5)] == [1] * 7  # never an empty pass
    # 4 pools of 0.5 CPU would take both CPUs and leave none for the read task (the tiny ablation's hang): 3 + 1
    four = load_config(EvaluateJobConfig, TINY, [
        "models={" + ", ".join(f"m{i}: '{two_models['base']}'" for i in range(4)) + "}",
        "actors.models_together=true", "actors.num_actors=1", "actors.cpus_per_actor=0.5"])  # fmt: skip
    assert [len(g) for g in passes(four, four.models, cpus=2.0)] == [3, 1]
