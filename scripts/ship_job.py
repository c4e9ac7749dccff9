"""Submit a job to a Ray cluster with the project's own code shipped alongside it (one command).

    .venv/bin/python scripts/ship_job.py --address http://127.0.0.1:8265 --token-file ~/.hscr/ray-token \\
        -- python -m jobs.pipeline --config jobs/configs/pipeline/base.yaml

What it does:
  1. builds the project wheel (hscr, hscr_platform, jobs + jobs/configs) from this checkout, in a temporary copy
     (the checkout is not touched), and strips its dependency list: a *code-only* wheel. Ray installs a
     ``py_modules`` wheel with ``pip install <wheel> --target=...``, which would otherwise resolve and download
     the whole pinned stack (torch, ray, vllm, ...) on every node; the stack comes from the image instead.
  2. writes a runtime env = ``cluster/runtime_env.yaml`` (env vars, upload excludes) + ``py_modules: [<wheel>]``
     into ``dist/ship/`` (git-ignored and excluded from the upload);
  3. runs ``ray job submit --address ... --working-dir . --runtime-env dist/ship/runtime_env.yaml -- <entrypoint>``
     from the repository root, with the token (``--token-file`` -> RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH; or
     whatever RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH the environment already has).

Ray uploads the wheel with the job, installs it on each node into the job's runtime-env folder and puts that
folder on PYTHONPATH, ahead of site-packages: the job imports ``hscr_platform`` from the checkout's code, not
from whatever version the image has. ``--build-only`` builds the wheel and the runtime env and prints their paths.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "hscr", "platform", "jobs")  # what the wheel is built from
OUT = Path("dist") / "ship"
DROPPED_METADATA = ("Requires-Dist:", "Provides-Extra:")


def build_wheel(source: Path, out_dir: Path) -> Path:
    """The project wheel built from ``source`` (a checkout) into ``out_dir``, dependency list stripped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hscr-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in SOURCES:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=ignore)
            else:
                shutil.copy2(src, copy / name)
        built = Path(tmp) / "wheels"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
               "--wheel-dir", str(built), str(copy)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the wheel failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        (wheel,) = built.glob("*.whl")
        target = out_dir / wheel.name
        strip_dependencies(wheel, target)
    return target


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def strip_dependencies(wheel: Path, target: Path) -> None:
    """Copy ``wheel`` to ``target`` without Requires-Dist / Provides-Extra in METADATA (RECORD updated)."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        lines = src.read(meta_name).decode().splitlines(keepends=True)
        metadata = "".join(ln for ln in lines if not ln.startswith(DROPPED_METADATA)).encode()
        record = []
        for line in src.read(record_name).decode().splitlines():
            if line.split(",", 1)[0] == meta_name:
                line = f"{meta_name},{_record_hash(metadata)},{len(metadata)}"
            record.append(line)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in names:
                data = {meta_name: metadata, record_name: ("\n".join(record) + "\n").encode()}.get(name)
                dst.writestr(src.getinfo(name), data if data is not None else src.read(name))


def runtime_env_with(base: Path, wheel: Path) -> dict[str, Any]:
    """The runtime env of ``base`` (a YAML file) with ``wheel`` added to its py_modules."""
    env: dict[str, Any] = yaml.safe_load(base.read_text()) or {}
    env["py_modules"] = [*env.get("py_modules", []), str(wheel.resolve())]
    return env


def submit_command(address: str, runtime_env: Path, entrypoint: list[str], extra: list[str]) -> list[str]:
    ray = str(Path(sys.executable).parent / "ray")
    return [ray, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env", str(runtime_env),
            *extra, "--", *entrypoint]  # fmt: skip


def submit_env(token_file: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if token_file is not None:
        if not token_file.is_file():
            raise FileNotFoundError(f"token file {token_file} does not exist")
        env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    return env


def prepare(repo: Path, base_env: Path, out_dir: Path) -> tuple[Path, Path]:
    """Build the wheel and write the runtime env next to it; (wheel, runtime env file)."""
    wheel = build_wheel(repo, out_dir)
    env_file = out_dir / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env_with(base_env, wheel), sort_keys=False))
    return wheel, env_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--address", help="the cluster's dashboard / Jobs API, e.g. http://127.0.0.1:8265")
    parser.add_argument("--token-file", type=Path, help="the cluster's Ray auth token (RAY_AUTH_TOKEN_PATH)")
    parser.add_argument("--runtime-env", type=Path, default=REPO / "cluster" / "runtime_env.yaml")
    parser.add_argument("--submission-id")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="build the wheel and runtime env, print them")
    parser.add_argument("entrypoint", nargs="*", help="after --: the job's command")
    args = parser.parse_args(argv)
    wheel, env_file = prepare(REPO, args.runtime_env, REPO / OUT)
    print(f"wheel: {wheel}\nruntime env: {env_file}", flush=True)
    if args.build_only:
        return 0
    if not args.address or not args.entrypoint:
        parser.error("--address and an entrypoint (after --) are required unless --build-only")
    extra = (["--submission-id", args.submission_id] if args.submission_id else []) + (
        ["--no-wait"] if args.no_wait else []
    )
    cmd = submit_command(args.address, env_file, args.entrypoint, extra)
    return subprocess.run(cmd, cwd=REPO, env=submit_env(args.token_file)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
