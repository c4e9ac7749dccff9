"""Check before work (hscr_platform.core.preflight): every problem listed at once, before anything is written."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from hscr_platform.core import preflight as pf
from hscr_platform.core.ray_local import free_ports

REPO = Path(__file__).resolve().parents[2]


def test_require_lists_every_failed_check_and_merges_shared_ones():
    def fails(message: str):
        def check() -> None:
            raise FileNotFoundError(message)

        return check

    checks = [
        ("a", fails("model folder /m does not exist")),
        ("b", lambda: None),
        ("c", fails("server down")),
        ("d", fails("server down")),  # the same problem in another stage: one line naming both
    ]
    with pytest.raises(pf.PreflightError) as caught:
        pf.require(checks, job="demo")
    assert caught.value.problems == [
        pf.Problem("a", "model folder /m does not exist"),
        pf.Problem("c, d", "server down"),
    ]
    assert str(caught.value) == (
        "demo: 2 problems found before any work started:\n  - a: model folder /m does not exist\n  - c, d: server down"
    )
    assert isinstance(caught.value, ValueError), "jobs exit 2 with the message (core.cli.job_main)"
    pf.require([("ok", lambda: None)], job="demo")  # nothing wrong: no error


def test_check_writable_and_exists(tmp_path):
    pf.check_writable(tmp_path / "new" / "deeper")  # not there yet: its nearest ancestor is writable
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        pf.check_writable(tmp_path / "file" / "below")
    with pytest.raises(FileNotFoundError, match=f"data {tmp_path / 'nope'} does not exist"):
        pf.check_exists(tmp_path / "nope", "data")
    assert pf.check_exists(tmp_path / "file") == tmp_path / "file"


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_check_tracking_server(tmp_path):
    pf.check_tracking_server(None)
    pf.check_tracking_server(f"sqlite:///{tmp_path}/runs/mlflow.db")
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(NotADirectoryError):
        pf.check_tracking_server(f"sqlite:///{tmp_path}/blocker/mlflow.db")
    (closed,) = free_ports(1, "127.0.0.1")
    with pytest.raises(ConnectionError, match=f"tracking server http://127.0.0.1:{closed} does not answer"):
        pf.check_tracking_server(f"http://127.0.0.1:{closed}", timeout_s=2)
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pf.check_tracking_server(f"http://127.0.0.1:{server.server_port}")  # any HTTP answer: a server is there
    finally:
        server.shutdown()


def test_check_ray_address(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pf.check_ray_address(None)
    pf.check_ray_address("local")
    with pytest.raises(ConnectionError, match="'auto', but no Ray cluster is running here"):
        pf.check_ray_address("auto", temp_dir=tmp_path)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        (tmp_path / "ray_current_cluster").write_text(address + "\n")
        pf.check_ray_address("auto", temp_dir=tmp_path)  # the running cluster's file, as Ray reads it
        pf.check_ray_address(f"ray://{address}")
        monkeypatch.setenv("RAY_ADDRESS", address)  # what `ray job submit` gives a job with address null
        pf.check_ray_address(None)
    (closed,) = free_ports(1, "127.0.0.1")
    with pytest.raises(ConnectionError, match=f"the Ray cluster at 127.0.0.1:{closed} does not answer"):
        pf.check_ray_address(f"127.0.0.1:{closed}", timeout_s=2)


def test_stage_checks_skip_what_the_run_makes_and_check_the_rest(tmp_path):
    root = tmp_path / "runs"
    seen: list[str] = []
    cfg = SimpleNamespace(
        model=SimpleNamespace(path=str(root / "sft" / "abc" / "model")),  # made by the SFT stage: skipped
        data=SimpleNamespace(input=str(tmp_path / "missing-data")),
        similarity=SimpleNamespace(model=None),
        tracking=SimpleNamespace(uri=None, enabled=True),
        ray=SimpleNamespace(address=None),
    )
    checks = pf.stage_checks("generate", cfg, check_model=seen.append, produced=[root])
    assert [what for what, _ in checks] == ["generate: data.input", "generate: ray.address"]
    assert [p.detail for p in pf.collect(checks)] == [f"input {tmp_path / 'missing-data'} does not exist"]
    cfg.model.path = str(tmp_path / "external-model")
    pf.collect(pf.stage_checks("generate", cfg, check_model=seen.append, produced=[root]))
    assert seen == [str(tmp_path / "external-model")], "model folders go to the caller's check"


def test_base_pipeline_fails_fast_listing_every_problem_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The base (cluster) profile on this machine: no model folder, no MLflow server, no cluster."""
    from hscr_platform.core.cli import job_main
    from hscr_platform.pipeline import PipelineConfig, run

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("HSCR_TRACEBACK", raising=False)
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exited:
        job_main(
            PipelineConfig,
            run,
            prog="jobs.pipeline",
            argv=["--config", "jobs/configs/pipeline/base.yaml", f"root={root}"],
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    print(err)
    assert "problems found before any work started" in err
    assert "sft: init.pretrained: model folder /mnt/shared/models/llava-med-v1.5-mistral-7b-hf does not exist" in err
    assert "generate: similarity.model: model /mnt/shared/models/all-MiniLM-L6-v2 does not exist" in err
    assert "the tracking server http://mlflow.hscr.svc.cluster.local:5000 does not answer" in err
    if not (pf.RAY_DEFAULT_TEMP / "ray_current_cluster").exists():
        assert "ray.address, sft: ray.address" in err and "no Ray cluster is running here" in err
    assert not root.exists(), "nothing written: no SynthMed output, not even the root folder"
    assert os.listdir(tmp_path) == []
