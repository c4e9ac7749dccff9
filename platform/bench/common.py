"""What every benchmark reports the same way: repeat statistics and memory sampled while a run goes.

spread([3.0, 1.0, 2.0]) -> {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
with PeakRss() as mem: ...                     # this process, sampled every 5 ms
with ProcessTreeRss(roles) as tree: ...        # this process and every descendant (Ray actors, workers)
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable, Sequence
from typing import Any


def spread(values: Sequence[float], *, digits: int = 3) -> dict[str, float]:
    """Median, min and max of repeated measurements (the median is the headline: robust to one slow repeat)."""
    if not values:
        raise ValueError("spread: no measurements")
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}  # fmt: skip


def ratio(num: dict[str, float], den: dict[str, float]) -> float:
    """Ratio of two medians (``spread`` dicts)."""
    return round(num["median"] / den["median"], 2)


class _Sampler:
    """Calls ``sample()`` every ``interval`` seconds on a daemon thread while the context is open."""

    interval = 0.005

    def __enter__(self) -> Any:
        self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class PeakRss(_Sampler):
    """Peak resident memory of this process while the context is open, in MiB (``start``: at entry)."""

    def __init__(self) -> None:
        self.start = self.peak = 0.0

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample(self) -> None:
        rss = self._rss()
        self.start = self.start or rss
        self.peak = max(self.peak, rss)


def ray_role(cmdline: Sequence[str]) -> str:
    """What a process of a local Ray run is, from its command line: the name Ray gives an actor or worker
    process (``ray::<ClassName>``, ``ray::<task>``, ``ray::IDLE``), else a Ray system process or 'other'."""
    text = " ".join(cmdline)
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0]
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if name in text:
            return f"system:{name}"
    return "other"


class ProcessTreeRss(_Sampler):
    """Peak RSS (MiB) of a process ('driver': ``root``, default this one) and of each of its descendants,
    sampled every ``interval`` s.

    ``peaks`` maps ``"<role> pid=<pid>"`` to its peak; ``role_of`` names a process from its command line
    (default: :func:`ray_role`). Descendants are found afresh at each sample, so actors started later count.
    """

    interval = 0.5

    def __init__(self, role_of: Callable[[Sequence[str]], str] = ray_role, *, interval: float = 0.5,
                 root: int | None = None):  # fmt: skip
        import psutil

        self.interval, self.role_of = interval, role_of
        self.me = psutil.Process(root)
        self.peaks: dict[str, float] = {}
        self.roles: dict[int, str] = {}

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.NoSuchProcess:  # the root has ended
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
                role = "driver" if proc.pid == self.me.pid else self.role_of(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if role.startswith("ray::") or role == "driver":  # a Ray process renames itself once it has a job
                self.roles[proc.pid] = role if role != "ray::IDLE" else self.roles.get(proc.pid, role)
            key = f"{self.roles.get(proc.pid, role)} pid={proc.pid}"
            self.peaks[key] = round(max(self.peaks.get(key, 0.0), rss), 1)

    def by_role(self) -> dict[str, float]:
        """The largest peak per role (driver, each actor class, each task name, system processes)."""
        out: dict[str, float] = {}
        for key, peak in self.peaks.items():
            role = key.rsplit(" pid=", 1)[0]
            out[role] = max(out.get(role, 0.0), peak)
        return dict(sorted(out.items()))
