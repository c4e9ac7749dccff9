"""Benchmark helpers: repeat statistics, process naming, and RSS sampled in a child process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hscr_platform.bench.common import ProcessTreeRss, ratio, ray_role, spread


def test_spread_and_ratio_of_medians():
    assert spread([3.0, 1.0, 2.0, 10.0, 2.5]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 5}
    assert ratio(spread([4.0, 6.0, 5.0]), spread([2.0, 2.5, 3.0])) == 2.0
    with pytest.raises(ValueError):
        spread([])


def test_ray_processes_are_named_by_their_title():
    assert ray_role(["ray::MapWorker(MapBatches(FusedActor))"]) == "ray::MapWorker(MapBatches(FusedActor))"
    assert ray_role(["ray::MapWorker(MapBatches(FusedActor)).submit"]) == "ray::MapWorker(MapBatches(FusedActor))"
    assert ray_role(["ray::RayTrainWorker.train_fn extra"]) == "ray::RayTrainWorker"  # the method is dropped
    assert ray_role(["/x/ray/core/src/ray/raylet/raylet", "--flag"]) == "system:raylet"
    assert ray_role(["python", "-c", "pass"]) == "other"


def test_a_childs_peak_rss_is_sampled_while_it_runs():
    """A child that holds ~150 MiB for a moment: its peak is seen, the driver's is its own."""
    code = "import time; x = bytearray(150 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
    with ProcessTreeRss(interval=0.05) as tree:
        subprocess.run([sys.executable, "-c", code], check=True)
    roles = tree.by_role()
    assert roles["other"] >= 150 and roles["driver"] > 0


def test_a_process_that_renames_itself_is_one_entry_under_its_last_real_name():
    """Ray workers start as ray::IDLE, then take an actor's name; going idle again keeps that name."""
    names = iter(["ray::IDLE", "ray::Scorer", "ray::IDLE"])
    last = {"name": "ray::IDLE"}

    def role_of(cmdline):
        last["name"] = next(names, last["name"])
        return last["name"]

    with ProcessTreeRss(role_of, interval=0.05) as tree:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0)"], check=True)
    child = [key for key in tree.peaks if key != f"driver pid={tree.me.pid}"]
    assert len(child) == 1 and child[0].startswith("ray::Scorer pid=")
    assert set(tree.by_role()) == {"driver", "ray::Scorer"}
