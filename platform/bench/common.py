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
    process (``ray::<ClassName>``, ``ray::<task>``, ``ray::IDLE``; the ``.<method>`` it is running right now is
    dropped, so one actor keeps one name), else a Ray system process or 'other'."""
    text = " ".join(cmdline)
    if cmdline and cmdline[0].startswith("ray::"):
        return _without_method(cmdline[0].split(" ")[0])
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if name in text:
            return f"system:{name}"
    return "other"


def _without_method(title: str) -> str:
    """``ray::MapWorker(MapBatches(X)).submit`` -> ``ray::MapWorker(MapBatches(X))``: cut at the first dot
    outside parentheses after the ``ray::`` prefix."""
    depth = 0
    for i, ch in enumerate(title[5:], start=5):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "." and depth == 0:
            return title[:i]
    return title


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
        self.pid_peaks: dict[int, float] = {}
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
            # a Ray worker starts as ray::IDLE and renames itself once it has an actor or task: keep the name
            if role != "ray::IDLE" or proc.pid not in self.roles:
                self.roles[proc.pid] = role
            self.pid_peaks[proc.pid] = round(max(self.pid_peaks.get(proc.pid, 0.0), rss), 1)

    @property
    def peaks(self) -> dict[str, float]:
        """``"<role> pid=<pid>"`` -> peak MiB, one entry per process, under the last name it had."""
        return {f"{self.roles[pid]} pid={pid}": peak for pid, peak in self.pid_peaks.items()}

    def by_role(self) -> dict[str, float]:
        """The largest peak per role (driver, each actor class, each task name, system processes)."""
        out: dict[str, float] = {}
        for pid, peak in self.pid_peaks.items():
            out[self.roles[pid]] = max(out.get(self.roles[pid], 0.0), peak)
        return dict(sorted(out.items()))
