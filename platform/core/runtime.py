"""Connecting to Ray: the cluster a job was submitted to, a configured address, or a private local instance."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hscr_platform.core.ray_local import TOKEN_FILE, auth_env, write_token

# Ray Train V2 patches `print` in its workers to also log through Train's logger; a Ray worker's stdout is already
# forwarded to the driver, so every worker line appeared twice. Workers print plainly, once.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where Ray runs. ``address: null`` = the submitting cluster (RAY_ADDRESS) if any, else a new local one."""

    address: str | None = None  # e.g. "auto" or "ray://head:10001"; null -> RAY_ADDRESS or a local instance
    num_cpus: int | None = None  # only for a new local instance (None = all cores)
    object_store_mb: int = 512  # only for a new local instance
    dashboard: bool = True  # local instance: serves the State API that Ray Train's controller polls, and Jobs

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.object_store_mb < 75:
            raise ValueError(f"object_store_mb must be >= 75 (Ray's minimum), got {self.object_store_mb}")


def init_ray(cfg: RayConfig) -> Any:
    """Start or join Ray once per process; returns the ray module.

    Under ``ray job submit`` RAY_ADDRESS points at the cluster and the job joins it (with the token its
    environment carries). Otherwise a fresh local instance is started (``address="local"``), never one left
    over by another program on the machine, with token authentication on (see ``use_local_token``).
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": dict(WORKER_ENV)})
        return ray
    use_local_token()
    _refresh_auth_config()
    for key, value in WORKER_ENV.items():  # a local instance's workers inherit the driver's environment
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=cfg.dashboard,
        log_to_driver=True,
    )
    return ray


def use_local_token() -> Path | None:
    """Token auth for a new local instance, with a token this process writes; returns its file, if written.

    Ray >= 2.59 turns token auth on for new local clusters and would write ``~/.ray/auth_token``, a file
    every Ray program of this user shares. Instead, unless the environment already names a token
    (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) or another mode (RAY_AUTH_MODE set to anything but ``token``, an
    explicit opt-out that is respected), a fresh token goes into a private temp folder (0700,
    file 0600, removed at exit) and RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH are set for this process and
    every Ray process it starts. Called again in the same process, it keeps the same token.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return None  # the user chose another mode explicitly
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_MODE"] = "token"  # a token given (or written by an earlier call): use it
        return None
    folder = Path(tempfile.mkdtemp(prefix="hscr-ray-auth-"))  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    token = write_token(folder / TOKEN_FILE)
    os.environ.update(auth_env(token))
    return token


def _refresh_auth_config() -> None:
    """Make an already imported Ray see the auth variables set since (Ray caches RAY_AUTH_MODE at import).

    The same two calls Ray makes itself when ``ray.init`` turns token auth on (authentication_token_setup).
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
