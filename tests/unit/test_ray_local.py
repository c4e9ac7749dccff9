"""hscr_platform.core.ray_local without starting Ray: ports, the command line, the environment, process matching.

Starting and stopping a real head is in tests/integration/test_ray_job_submit.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hscr_platform.core import ray_local


def test_free_ports_are_distinct_and_bindable():
    ports = ray_local.free_ports(9)
    assert len(set(ports)) == 9
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))


def test_free_port_range_avoids_given_ports():
    low, high = ray_local.free_port_range(50, avoid=set(range(20000, 40000)))
    assert high - low == 49 and low >= 40000 and high < 60000


def test_long_temp_dirs_are_refused_before_ray_fails_on_its_sockets(tmp_path):
    with pytest.raises(ValueError, match="too long for Ray's unix sockets"):
        ray_local.start_local_head(tmp_path / ("x" * 80), num_cpus=1)
    assert not (tmp_path / ("x" * 80)).exists()


def test_start_command_sets_every_port_the_temp_dir_and_no_stats():
    ports = {"port": 1, "dashboard_port": 2, "ray_client_server_port": 3, "min_worker_port": 4}
    cmd = ray_local._start_command("/v/bin/ray", Path("/tmp/r"), ports, 2, "127.0.0.1")
    assert cmd[:3] == ["/v/bin/ray", "start", "--head"]
    for flag in ("--port=1", "--dashboard-port=2", "--ray-client-server-port=3", "--min-worker-port=4"):
        assert flag in cmd
    assert {"--temp-dir=/tmp/r", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats"} <= set(cmd)


def test_head_env_turns_token_auth_on_with_its_own_token_and_puts_the_venv_first(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")  # would take precedence over the token file
    opt_out = "disabled"  # a shell's opt-out must not reach the head
    monkeypatch.setenv("RAY_AUTH_MODE", opt_out)
    env = ray_local._head_env("/some/venv/bin/ray", Path("/tmp/r/auth_token"))
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/tmp/r/auth_token"
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env
    assert env["PATH"].split(":")[0] == "/some/venv/bin"


def test_client_env_carries_the_heads_token_or_none_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale")
    head = ray_local.HeadInfo(
        temp_dir=str(tmp_path), address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2", gcs_port=1,
        dashboard_port=2, client_port=3, num_cpus=1, python_bin="/v/bin", token_path=str(tmp_path / "auth_token"),
    )  # fmt: skip
    env = ray_local.client_env(head)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == head.token_path
    assert "RAY_AUTH_TOKEN" not in env
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(ray_local.client_env(None))


def test_write_token_is_a_fresh_random_owner_only_file(tmp_path):
    first = ray_local.write_token(tmp_path / "a")
    second = ray_local.write_token(tmp_path / "b")
    assert first.stat().st_mode & 0o777 == 0o600
    assert len(first.read_text()) == 64 and first.read_text() != second.read_text()
    int(first.read_text(), 16)  # hex
    with pytest.raises(FileExistsError):  # never overwrites (or widens) an existing file
        ray_local.write_token(first)
    assert ray_local.auth_header(first) == {"Authorization": f"Bearer {first.read_text()}"}


def test_head_processes_match_the_dir_as_a_whole_path(tmp_path):
    mine, other = tmp_path / "ray-ab", tmp_path / "ray-abc"
    code = "import time; time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code, f"--log_dir={d}/session/logs"]) for d in (mine, other)]
    try:
        time.sleep(0.5)
        assert {p.pid for p in ray_local.head_processes(mine)} == {procs[0].pid}
        assert ray_local.stop_head(str(mine), timeout_s=5) == 1
        assert procs[0].wait(timeout=10) is not None and procs[1].poll() is None, "only the matching one"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_stop_head_of_nothing_is_a_no_op(tmp_path):
    assert ray_local.stop_head(str(tmp_path / "never-started")) == 0
