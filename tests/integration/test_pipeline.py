"""The tiny pipeline end to end on a private local Ray: SynthMed -> SFT on Ray Train (2 workers) -> report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hscr_platform.models.loading import ModelConfig, load_vlm

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run_pipeline(root: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        "--config",
        "jobs/configs/pipeline/tiny.yaml",
        f"root={root}",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run():
    # a root relative to the working directory, as in the demo: Ray workers run elsewhere and must get
    # absolute paths from the driver
    # (a top-level folder of its own, removed whole: an empty runs/ left behind would be uploaded by ray job submit)
    relative = Path(f"runs-test-pipeline-{uuid.uuid4().hex[:8]}")
    proc = run_pipeline(relative)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield REPO / relative, proc
    shutil.rmtree(REPO / relative, ignore_errors=True)


def _one(folder: Path) -> Path:
    (only,) = [p for p in folder.iterdir() if p.is_dir()]
    return only


def test_stages_write_their_outputs(first_run):
    root, proc = first_run
    synth = _one(root / "synthmed")
    assert (synth / "_SUCCESS").is_file() and (synth / "preview.png").is_file()
    sft = _one(root / "sft")
    for name in ("model/config.json", "metrics.jsonl", "curves.png", "eval.json", "config.yaml", "_SUCCESS"):
        assert (sft / name).exists(), name
    history = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in history} == {"vision", "qa"}
    gen = _one(root / "generate")
    assert list((gen / "preferences").glob("part-*.parquet")) and (gen / "summary.json").is_file()
    runs = sorted((root / "train").iterdir())
    assert len(runs) == 2 and all((r / "_SUCCESS").is_file() and (r / "model" / "config.json").is_file() for r in runs)
    evaluation = json.loads((_one(root / "evaluate") / "results.json").read_text())
    assert set(evaluation["results"]) == {"base", "hscr", "dpo"}
    report = (root / "report.md").read_text()
    assert "| metric | base | hscr | dpo |" in report and "mlflow ui --backend-store-uri sqlite:///" in report
    assert "| question type | rows | preferences | yield | 1 level" in report and "ablation.yaml" in report
    assert (root / "mlflow.db").is_file() and "# HSCR pipeline report" in proc.stdout


def test_trained_model_loads_through_the_generic_loader(first_run):
    root, _ = first_run
    model, processor = load_vlm(ModelConfig(path=str(_one(root / "sft") / "model")))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.chat_template


def test_second_run_reuses_every_stage(first_run):
    root, _ = first_run
    proc = run_pipeline(root.relative_to(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "synthmed: cached" in out and "[sft] cached" in out and "0 to do" in out
    assert out.count("[train] already complete") == 2 and "evaluate: cached" in out


def test_bad_stage_override_fails_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", "jobs/configs/pipeline/tiny.yaml",
           f"root={tmp_path}", "overrides={sft: [train.stepz=3]}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr
    assert not (tmp_path / "sft").exists()
