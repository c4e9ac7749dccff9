"""Integration fixtures: one private local Ray instance per test module (never another program's cluster)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from hscr_platform.core.runtime import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2, object_store_mb=256, dashboard=False))
    yield
    ray.shutdown()
