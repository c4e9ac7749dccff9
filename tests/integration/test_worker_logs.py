"""Each line a Ray Train worker prints reaches the driver's output once (Train V2's print patch would double it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

DRIVER = textwrap.dedent(
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from hscr_platform.core.runtime import RayConfig, init_ray


    def loop():
        for step in range(3):
            print(f"[probe] step {step} of 3", flush=True)


    init_ray(RayConfig(num_cpus=2, object_store_mb=128, dashboard=True))
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5})).fit()
    """
)


def _probe_lines(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in (out.stdout + out.stderr).splitlines() if "[probe]" in line]


def test_worker_lines_appear_once_in_the_driver_output():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TRAIN_ENABLE_PRINT")}
    lines = _probe_lines(env)
    steps = [line.split("[probe] ")[1] for line in lines]
    assert sorted(steps) == ["step 0 of 3", "step 1 of 3", "step 2 of 3"], lines  # each once, none lost
