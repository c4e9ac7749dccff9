"""A private local Ray head on free ports, and stopping exactly that head (never ``ray stop``).

``ray stop`` stops every Ray cluster on the machine, and Ray's default ports and ``/tmp/ray`` are shared by
everyone on it. This helper starts a head with every port chosen free, its own ``--temp-dir`` (so its
``ray_current_cluster`` file and session folders stay there) and Ray's token authentication on, with a fresh
token the head writes into its temp dir (``<temp>/auth_token``, mode 0600; never ``~/.ray/auth_token``, which
other programs on the machine share). Clients pass it with ``client_env(head)`` (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH): a request without it is refused (HTTP 401 from the Jobs API). Stopping it terminates
only the processes of that head: the ones whose command line names its temp dir (GCS, raylet, dashboard,
agents, monitors) and all their descendants (workers, job supervisors, job drivers and the processes those
spawn).

    from hscr_platform.core.ray_local import start_local_head, stop_head
    head = start_local_head("/tmp/hscr-ray", num_cpus=2)
    # RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={head.token_path} \\
    #     ray job submit --address {head.dashboard_url} --working-dir . -- python -m jobs.pipeline ...
    stop_head(head)

Or from a shell: ``python -m hscr_platform.core.ray_local start /tmp/hscr-ray --num-cpus 2`` (prints the head as
JSON, ``token_path`` included) and ``python -m hscr_platform.core.ray_local stop /tmp/hscr-ray``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
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
TOKEN_FILE = "auth_token"  # the head's token, in its temp dir (0600)
# Ray's AF_UNIX sockets: <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (Linux: 107 bytes)
_SOCKET_SUFFIX_CHARS = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where Ray reads its token from


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
    token_path: str  # the head's auth token (RAY_AUTH_TOKEN_PATH for its clients)


def write_token(path: str | os.PathLike[str]) -> Path:
    """A new random token (256 bits, hex) in a new file ``path`` readable by its owner only (0600)."""
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never reuse or widen a file
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return target


def auth_env(token_path: str | os.PathLike[str]) -> dict[str, str]:
    """The variables that make a Ray process (head, worker, CLI, SDK) use token auth with this token file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.fspath(token_path)}


def auth_header(token_path: str | os.PathLike[str]) -> dict[str, str]:
    """The HTTP header that authenticates a request to the head's dashboard / Jobs REST API."""
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"}


def client_env(head: HeadInfo | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `ray` CLI / SDK clients of ``head``: its token, no stats, no RAY_ADDRESS.

    Any token already in the environment is dropped first; ``head=None`` gives a client with no token at all
    (what a stranger on the network has).
    """
    env = dict(os.environ if base is None else base)
    for name in ("RAY_ADDRESS", *AUTH_VARS):
        env.pop(name, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if head is not None:
        env |= auth_env(head.token_path)
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


def _head_env(ray_bin: str, token_path: Path) -> dict[str, str]:
    """The head's environment: token auth with its own token, the venv's bin first on PATH (jobs run `python`)."""
    env = client_env(None) | auth_env(token_path)
    env["PATH"] = os.pathsep.join([str(Path(ray_bin).parent), env.get("PATH", "")])
    return env


def _wait_for_dashboard(url: str, token_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/api/version", headers=auth_header(token_path))
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
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
    """Start a Ray head on free ports under ``temp_dir`` (token auth, a new token); return where it listens.

    ``ray_bin`` defaults to the `ray` next to this Python, so the head's workers and job drivers use this
    environment's interpreter and packages. On failure, whatever was started is stopped before raising.
    """
    temp = Path(temp_dir).resolve()
    _check_temp_dir(temp)
    temp.mkdir(parents=True, exist_ok=True)
    token = temp / TOKEN_FILE
    token.unlink(missing_ok=True)  # a head left in this dir before: its token is not this head's
    write_token(token)
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
        token_path=str(token),
    )
    try:
        proc = subprocess.run(cmd, env=_head_env(ray, token), capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        _wait_for_dashboard(info.dashboard_url, token, timeout_s)
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
