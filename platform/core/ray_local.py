"""A private local Ray head on free ports, and stopping exactly that head (never ``ray stop``).

``ray stop`` stops every Ray cluster on the machine, and Ray's default ports and ``/tmp/ray`` are shared by
everyone on it. This helper starts a head with every port chosen free, its own ``--temp-dir`` (so its
``ray_current_cluster`` file and session folders stay there) and token auth off (Ray 2.60 turns it on by
default for new local clusters and writes ``~/.ray/auth_token``). Stopping it terminates only the processes of
that head: the ones whose command line names its temp dir (GCS, raylet, dashboard, agents, monitors) and all
their descendants (workers, job supervisors, job drivers and the processes those spawn).

    from hscr_platform.core.ray_local import start_local_head, stop_head
    head = start_local_head("/tmp/hscr-ray", num_cpus=2)
    # ray job submit --address {head.dashboard_url} --working-dir . -- python -m jobs.pipeline ...
    stop_head(head)

Or from a shell: ``python -m hscr_platform.core.ray_local start /tmp/hscr-ray --num-cpus 2`` (prints the head as
JSON) and ``python -m hscr_platform.core.ray_local stop /tmp/hscr-ray``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

INFO_FILE = "hscr_head.json"  # written into the temp dir, so `stop` works from another process
# Ray's AF_UNIX sockets: <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (Linux: 107 bytes)
_SOCKET_SUFFIX_CHARS = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107
# Ray 2.60: token auth is on by default for new local clusters; a private test head needs none
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class HeadInfo:
    """Where a local head listens; ``dashboard_url`` is the Jobs API (``ray job submit --address``)."""

    temp_dir: str
    address: str  # GCS address host:port (ray.init(address=...), RAY_ADDRESS)
    dashboard_url: str  # http://host:port
    gcs_port: int
    dashboard_port: int
    client_port: int  # Ray Client server (ray://host:port)
    num_cpus: int
    python_bin: str  # the folder whose `python` the head's jobs run (first on the head's PATH)


def client_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `ray` CLI / SDK clients of a private head: auth off, no stats, no RAY_ADDRESS."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)
    env.update(CLIENT_ENV)
    return env


def _port_is_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "") -> list[int]:
    """``count`` distinct ports free right now on every interface (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in socks:
            sock.close()
    return ports


def free_port_range(size: int, host: str = "", avoid: set[int] | None = None) -> tuple[int, int]:
    """A contiguous range of ``size`` free ports in 20000-59999 (Ray workers take one each)."""
    avoid = avoid or set()
    for _ in range(200):
        low = random.randrange(20000, 60000 - size)
        ports = range(low, low + size)
        if not avoid.intersection(ports) and all(_port_is_free(p, host) for p in ports):
            return low, low + size - 1
    raise RuntimeError(f"no range of {size} free ports found in 20000-59999")


def _check_temp_dir(temp_dir: Path) -> None:
    if len(str(temp_dir)) + _SOCKET_SUFFIX_CHARS > _MAX_SOCKET_PATH:
        room = _MAX_SOCKET_PATH - _SOCKET_SUFFIX_CHARS
        raise ValueError(
            f"temp dir {temp_dir} is too long for Ray's unix sockets: use at most {room} characters "
            "(e.g. tempfile.mkdtemp(prefix='ray-', dir='/tmp'))"
        )


def _start_command(ray_bin: str, temp_dir: Path, ports: dict[str, int], num_cpus: int, host: str) -> list[str]:
    flags = {f"--{name.replace('_', '-')}": str(port) for name, port in ports.items()}
    flags |= {
        "--node-ip-address": host,
        "--dashboard-host": host,
        "--include-dashboard": "true",
        "--temp-dir": str(temp_dir),
        "--num-cpus": str(num_cpus),
        "--num-gpus": "0",
    }
    return [ray_bin, "start", "--head", *(f"{k}={v}" for k, v in flags.items()), "--disable-usage-stats"]


def _head_env(ray_bin: str) -> dict[str, str]:
    """The head's environment: auth off, and the venv's bin first on PATH (job entrypoints run `python`)."""
    env = client_env()
    env["PATH"] = os.pathsep.join([str(Path(ray_bin).parent), env.get("PATH", "")])
    return env


def _wait_for_dashboard(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray dashboard at {url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def start_local_head(
    temp_dir: str | os.PathLike[str],
    *,
    num_cpus: int,
    object_store_mb: int = 256,
    worker_ports: int = 100,
    host: str = "127.0.0.1",
    ray_bin: str | None = None,
    timeout_s: float = 120.0,
) -> HeadInfo:
    """Start a Ray head on free ports under ``temp_dir`` (auth off); return where it listens.

    ``ray_bin`` defaults to the `ray` next to this Python, so the head's workers and job drivers use this
    environment's interpreter and packages. On failure, whatever was started is stopped before raising.
    """
    temp = Path(temp_dir).resolve()
    _check_temp_dir(temp)
    temp.mkdir(parents=True, exist_ok=True)
    ray = ray_bin or str(Path(sys.executable).parent / "ray")
    names = ["port", "dashboard_port", "ray_client_server_port", "node_manager_port", "object_manager_port"]
    names += ["dashboard_agent_listen_port", "dashboard_agent_grpc_port", "runtime_env_agent_port"]
    names += ["metrics_export_port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))  # Ray binds some on every interface
    low, high = free_port_range(worker_ports, avoid=set(ports.values()))
    ports |= {"min_worker_port": low, "max_worker_port": high}
    cmd = _start_command(ray, temp, ports, num_cpus, host)
    cmd.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    info = HeadInfo(
        temp_dir=str(temp),
        address=f"{host}:{ports['port']}",
        dashboard_url=f"http://{host}:{ports['dashboard_port']}",
        gcs_port=ports["port"],
        dashboard_port=ports["dashboard_port"],
        client_port=ports["ray_client_server_port"],
        num_cpus=num_cpus,
        python_bin=str(Path(ray).parent),
    )
    try:
        proc = subprocess.run(cmd, env=_head_env(ray), capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        _wait_for_dashboard(info.dashboard_url, timeout_s)
    except BaseException:
        stop_head(info)
        raise
    (temp / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def read_head(temp_dir: str | os.PathLike[str]) -> HeadInfo:
    """The HeadInfo that start_local_head wrote into ``temp_dir``."""
    return HeadInfo(**json.loads((Path(temp_dir).resolve() / INFO_FILE).read_text()))


def _names_dir(proc: psutil.Process, pattern: re.Pattern[str]) -> bool:
    try:
        return any(pattern.search(arg) for arg in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def head_processes(temp_dir: str | os.PathLike[str]) -> list[psutil.Process]:
    """The processes of the head in ``temp_dir``: those naming it on their command line, and descendants."""
    # the dir as a whole path component: /tmp/ray-ab must not match /tmp/ray-abc (another head)
    pattern = re.compile(re.escape(str(Path(temp_dir).resolve())) + r"(?=$|[/\s'\",;:])")
    me = psutil.Process()
    protected = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid in protected or not _names_dir(proc, pattern):
            continue
        found[proc.pid] = proc
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found |= {child.pid: child for child in proc.children(recursive=True)}
    return [proc for pid, proc in found.items() if pid not in protected]


def stop_head(info: HeadInfo | str | os.PathLike[str], *, timeout_s: float = 5.0) -> int:
    """Stop only this head's processes (SIGTERM, SIGKILL after ``timeout_s``); return how many there were.

    Other Ray clusters on the machine are left alone. Safe to call twice, or after a failed start. The grace
    period is short because gcs_server and the autoscaler monitor outlive SIGTERM for many seconds.
    """
    temp_dir = info.temp_dir if isinstance(info, HeadInfo) else os.fspath(info)
    procs = head_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def remove_head_dir(info: HeadInfo) -> None:
    """Delete a stopped head's temp dir (logs, sessions, its ray_current_cluster file)."""
    shutil.rmtree(info.temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hscr_platform.core.ray_local", description=(__doc__ or "").splitlines()[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a private head; print it as JSON")
    start.add_argument("temp_dir")
    start.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    start.add_argument("--object-store-mb", type=int, default=256)
    stop = sub.add_parser("stop", help="stop only the head started in this temp dir")
    stop.add_argument("temp_dir")
    args = parser.parse_args(argv)
    if args.action == "start":
        head = start_local_head(args.temp_dir, num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)
        print(json.dumps(asdict(head), indent=2))
    else:
        print(f"stopped {stop_head(args.temp_dir)} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
