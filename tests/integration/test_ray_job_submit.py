"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.<name>`, for real.

A private Ray head (hscr_platform.core.ray_local: free ports, its own temp dir, token auth on with its own token)
stands in for the cluster; a client without the token is refused, the tiny pipeline is submitted with it exactly
as the cluster README submits the base one, and only that head is stopped afterwards (never `ray stop`, which
would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hscr_platform.core.ray_local import (
    HeadInfo,
    auth_header,
    client_env,
    head_processes,
    start_local_head,
    stop_head,
)

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 420
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head() -> Iterator[HeadInfo]:
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths live under it
    info = None
    try:
        info = start_local_head(temp, num_cpus=2)
        yield info
    finally:
        stop_head(info if info is not None else temp)
        shutil.rmtree(temp, ignore_errors=True)


def submit_command(head: HeadInfo, job_id: str, *entrypoint: str) -> list[str]:
    return [RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
            "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", job_id, "--no-wait",
            "--", *entrypoint]  # fmt: skip


def submit(head: HeadInfo, *entrypoint: str) -> str:
    """`ray job submit --no-wait` from the repository root, with the head's token; returns the submission id."""
    job_id = f"hscr-test-{uuid.uuid4().hex[:8]}"
    cmd = submit_command(head, job_id, *entrypoint)
    proc = subprocess.run(cmd, cwd=REPO, env=client_env(head), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return job_id


def _get(head: HeadInfo, path: str) -> Any:
    request = urllib.request.Request(f"{head.dashboard_url}{path}", headers=auth_header(head.token_path))
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def logs(head: HeadInfo, job_id: str) -> str:
    return _get(head, f"/api/jobs/{job_id}/logs")["logs"]


def wait(head: HeadInfo, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    """Poll the Jobs REST API until the job ends; return (status, logs)."""
    deadline = time.monotonic() + timeout_s
    status = "PENDING"
    while time.monotonic() < deadline:
        status = _get(head, f"/api/jobs/{job_id}")["status"]
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(3)
    return status, logs(head, job_id)


def test_a_submission_without_the_token_is_refused_and_one_with_it_runs(head, tmp_path):
    job_id = f"hscr-test-{uuid.uuid4().hex[:8]}"
    stranger = client_env(None) | {"HOME": str(tmp_path)}  # no token anywhere, not even ~/.ray/auth_token
    cmd = submit_command(head, job_id, "python", "-c", "print('should never run')")
    refused = subprocess.run(cmd, cwd=REPO, env=stranger, capture_output=True, text=True, timeout=300)
    print("without the token:", refused.returncode, (refused.stdout + refused.stderr).strip().splitlines()[-3:])
    assert refused.returncode != 0
    assert "Unauthorized: Missing authentication token" in refused.stdout + refused.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    with pytest.raises(urllib.error.HTTPError) as denied:  # the REST API too, with a wrong token
        urllib.request.urlopen(urllib.request.Request(f"{head.dashboard_url}/api/jobs/", headers=auth_header(wrong)))
    assert denied.value.code == 403
    assert not any(j.get("submission_id") == job_id for j in _get(head, "/api/jobs/")), "nothing was queued"
    accepted = submit(head, "python", "-c", "import os; print('ACCEPTED', os.environ['RAY_AUTH_MODE'])")
    status, out = wait(head, accepted, timeout_s=180)
    print("with the token:", status, [ln for ln in out.splitlines() if ln.startswith("ACCEPTED")])
    assert status == "SUCCEEDED" and "ACCEPTED token" in out, out[-3000:]


def test_submitted_job_runs_the_uploaded_checkout_with_the_installed_package(head):
    probe = (
        "import json, os, platform, hscr, hscr_platform.core.cli, jobs; print('PROBE', json.dumps({"
        "'cwd': os.getcwd(), 'entries': sorted(os.listdir('.')), 'platform': platform.__file__,"
        "'hscr_platform': hscr_platform.core.cli.__file__, 'jobs': jobs.__file__, 'hscr': hscr.__file__,"
        "'offline': os.environ.get('HF_HUB_OFFLINE'), 'omp': os.environ.get('OMP_WAIT_POLICY')}))"
    )
    job_id = submit(head, "python", "-c", probe)
    status, out = wait(head, job_id, timeout_s=180)
    assert status == "SUCCEEDED", out[-4000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("PROBE ")]
    seen = json.loads(line.removeprefix("PROBE "))
    cwd = seen["cwd"]
    assert cwd.startswith(head.temp_dir) and "working_dir_files" in cwd, "cwd = the uploaded working dir"
    assert {"jobs", "hscr", "cluster", "pyproject.toml"} <= set(seen["entries"])
    leaked = {".venv", "runs", "build", ".git", ".cache"} & set(seen["entries"])
    assert not leaked, f"the upload must exclude {sorted(leaked)}"
    assert seen["jobs"].startswith(cwd) and seen["hscr"].startswith(cwd), "jobs/ and hscr/ from the upload"
    assert not seen["hscr_platform"].startswith(cwd), "hscr_platform from the installed package"
    assert not seen["platform"].startswith(cwd), "the stdlib platform module, not the repo's platform/"
    assert seen["offline"] == "1" and seen["omp"] == "PASSIVE", "env_vars of cluster/runtime_env.yaml"


@pytest.mark.slow  # the whole tiny pipeline again (~4 min on 2 cores): make test-slow; make test keeps the
# token, upload and shipped-wheel submissions above, and tests/integration/test_pipeline.py runs the pipeline itself
def test_tiny_pipeline_submitted_as_a_ray_job_succeeds(head, tmp_path):
    root = tmp_path / "runs"  # absolute: the job's cwd is the uploaded copy of the repository
    t0 = time.monotonic()
    job_id = submit(
        head, "python", "-m", "jobs.pipeline", "--config", "jobs/configs/pipeline/tiny.yaml", f"root={root}"
    )
    status, out = wait(head, job_id)
    print(f"job {job_id}: {status} in {time.monotonic() - t0:.0f}s")
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; last logs:\n{out[-6000:]}"
    (synth,) = (root / "synthmed").iterdir()
    assert (synth / "_SUCCESS").is_file()
    (sft,) = (root / "sft").iterdir()
    assert (sft / "model" / "config.json").is_file() and (sft / "_SUCCESS").is_file()
    report = json.loads((sft / "eval.json").read_text())
    assert 0.0 <= report["metrics"]["closed_accuracy"] <= 1.0
    assert "| closed accuracy |" in out and "[pipeline] done" in out


def _ship_job_script() -> Any:
    spec = importlib.util.spec_from_file_location("ship_job", REPO / "scripts" / "ship_job.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_wheel_is_what_the_job_imports_not_the_heads_environment(head, tmp_path):
    """scripts/ship_job.py's wheel, built from a checkout with a module the head's environment lacks."""
    ship = _ship_job_script()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ship.SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, checkout / name)
    mark = uuid.uuid4().hex
    (checkout / "platform" / "core" / "_shipped_probe.py").write_text(f"MARK = {mark!r}\n")  # an edit not installed
    wheel, env_file = ship.prepare(checkout, REPO / "cluster" / "runtime_env.yaml", tmp_path / "ship")
    probe = (
        "import json, hscr_platform.core as core, hscr_platform.core.cli as cli, hscr_platform.core._shipped_probe"
        " as probe; print('SHIPPED', json.dumps({'mark': probe.MARK, 'core': core.__file__, 'cli': cli.__file__}))"
    )
    job_id = f"hscr-test-{uuid.uuid4().hex[:8]}"
    cmd = ship.submit_command(head.dashboard_url, env_file, ["python", "-c", probe], ["--submission-id", job_id])
    proc = subprocess.run(cmd, cwd=REPO, env=client_env(head), capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("SHIPPED ")]
    print(f"wheel {wheel.name}; the job printed: {line}")
    seen = json.loads(line.removeprefix("SHIPPED "))
    assert seen["mark"] == mark, "the job ran the shipped code"
    for path in (seen["core"], seen["cli"]):
        assert path.startswith(head.temp_dir) and "py_modules_files" in path, path
        assert not path.startswith(str(REPO)), "not the head's own (editable) install"


def test_stop_head_stops_only_that_head(head):
    # a stand-in for another head whose temp dir shares a prefix with this one's
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--temp-dir={head.temp_dir}x"])
    try:
        names = {p.name() for p in head_processes(head.temp_dir)}
        assert {"gcs_server", "raylet"} <= names, names
        assert stop_head(head) > 0
        assert not head_processes(head.temp_dir), "every process of the head is gone"
        assert decoy.poll() is None, "a process of another temp dir is left alone"
    finally:
        decoy.kill()
        decoy.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=5)
    assert Path(head.token_path).stat().st_mode & 0o777 == 0o600, "the token file is the owner's only"
    assert (Path(head.temp_dir) / "ray_current_cluster").is_file(), "the address file stays in the temp dir"
