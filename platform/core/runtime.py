"""Connecting to Ray: the cluster a job was submitted to, a configured address, or a private local instance."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


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

    Under ``ray job submit`` RAY_ADDRESS points at the cluster and the job joins it. Otherwise a fresh local
    instance is started (``address="local"``), never one left over by another program on the machine.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=cfg.dashboard,
        log_to_driver=True,
    )
    return ray
