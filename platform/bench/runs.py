"""Pieces the end-to-end benchmarks (scale, badinput) share: SynthMed inputs, a tiny model, job subprocesses
watched for memory, and the exactly-once check of a generation output.

Each job runs as its own ``python -m jobs.<name>`` process with its own private local Ray, so every process
the job starts (its Ray system processes, actors, Train workers) is a descendant of it and its memory is its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from hscr_platform.bench.common import ProcessTreeRss
from hscr_platform.core.io import shard_files
from hscr_platform.models.toy import ToyModelConfig


def tiny_model() -> ToyModelConfig:
    """The tests' tiny toy Med-VLM (tests/conftest.py): fast enough to stream 100k rows on 2 cores."""
    return ToyModelConfig(vocab_size=300, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                          text_layers=2, text_heads=2, text_intermediate=64, max_positions=160)  # fmt: skip


def synthmed_rows(folder: Path, rows: int, *, rows_per_shard: int, seed: int = 0) -> Path:
    """``rows`` SynthMed training samples in ``folder/train`` (made once; reused when already there)."""
    from hscr_platform.core.config import load_config
    from hscr_platform.data.synthmed.job import SynthMedJobConfig, generate_dataset

    if not shard_files(folder / "train"):
        overrides = [f"output.path={folder}", f"synthmed.splits.train={rows}", "synthmed.splits.validation=0",
                     "synthmed.splits.test=0", f"synthmed.rows_per_shard={rows_per_shard}", f"synthmed.seed={seed}",
                     "synthmed.workers=2"]  # fmt: skip
        generate_dataset(load_config(SynthMedJobConfig, "jobs/configs/synthmed/tiny.yaml", overrides))
    return folder / "train"


def build_model(folder: Path, samples: Path, spec: ToyModelConfig) -> Path:
    """An untrained toy model whose tokenizer is trained on the first questions and answers of ``samples``."""
    from hscr_platform.models.toy import create_toy_model

    if (folder / "config.json").is_file():
        return folder
    texts: list[str] = []
    for row in iter_column_rows(samples, ["question", "answer"]):
        texts += [row["question"], row["answer"]]
        if len(texts) >= 2000:
            break
    return create_toy_model(spec, texts, folder)


def iter_column_rows(folder: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of a few columns of every shard (never the images)."""
    for path in shard_files(folder):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
            yield from batch.to_pylist()


@dataclass
class JobRun:
    """One job subprocess: wall seconds, exit code, peak RSS per process role, and whether it was killed."""

    seconds: float
    returncode: int
    peaks: dict[str, float]  # role (driver, ray::<Actor>, ray::<task>, system:<name>) -> peak MiB
    processes: dict[str, float]  # "<role> pid=<pid>" -> peak MiB
    killed: bool
    log: str
    attempts: int = 1
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, units done) on change


def steady_rate(progress: Sequence[tuple[float, int]]) -> float | None:
    """Units per second between the first and the last progress mark: the rate once the job is running, its
    start-up (Ray, model load) and shutdown left out. None with fewer than two marks."""
    if len(progress) < 2 or progress[-1][0] <= progress[0][0]:
        return None
    (t0, n0), (t1, n1) = progress[0], progress[-1]
    return round((n1 - n0) / (t1 - t0), 2)


def last_number(path: Path, pattern: str) -> Callable[[], int]:
    """A progress counter: the number in the last match of ``pattern`` (one regex group) in a log a job
    writes to (0 before the first), reading only the bytes added since the last call."""
    import re

    regex, state = re.compile(pattern.encode()), {"offset": 0, "value": 0}

    def count() -> int:
        try:
            with path.open("rb") as fh:
                fh.seek(state["offset"])
                added = fh.read()
        except FileNotFoundError:
            return 0
        cut = added.rfind(b"\n") + 1  # whole lines only; a partial last line is read again next time
        state["offset"] += cut
        found = regex.findall(added[:cut])
        if found:
            state["value"] = int(found[-1])
        return state["value"]

    return count


def run_job(module: str, config: str, overrides: Sequence[str], *, log: Path, interval: float = 1.0,
            kill_when: Callable[[], bool] | None = None, progress: Callable[[], int] | None = None,
            timeout: float = 6 * 3600) -> JobRun:  # fmt: skip
    """Run ``python -m <module> --config <config> <overrides>`` in its own session, sampling the RSS of it
    and of every descendant; ``kill_when()`` true -> SIGKILL the whole session once (a killed driver);
    ``progress()`` (units done so far) is polled with it and its changes are kept with their times."""
    cmd = [sys.executable, "-m", module, "--config", config, *overrides]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    killed, t0, marks = False, time.perf_counter(), list[tuple[float, int]]()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            with ProcessTreeRss(root=proc.pid, interval=interval) as tree:
                while proc.poll() is None:
                    done = progress() if progress is not None else None
                    if done is not None and done > 0 and (not marks or done != marks[-1][1]):
                        marks.append((round(time.perf_counter() - t0, 2), done))
                    if kill_when is not None and not killed and kill_when():
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                    if time.perf_counter() - t0 > timeout:
                        raise TimeoutError(f"{module} ran over {timeout} s (log: {log})")
                    time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return JobRun(round(time.perf_counter() - t0, 2), proc.returncode, tree.by_role(), dict(tree.peaks), killed,
                  str(log), progress=marks)  # fmt: skip


RAY_START_TIMEOUT = "timed out during startup"  # Ray's own 30 s limit, hit on an overloaded machine


def run_job_retrying(module: str, config: str, overrides: Sequence[str], *, log: Path, interval: float = 1.0,
                     retries: int = 2, kill_when: Callable[[], bool] | None = None,
                     progress: Callable[[], int] | None = None) -> JobRun:  # fmt: skip
    """:func:`run_job`, rerun (the jobs resume) when only Ray's start-up timed out; the seconds of every
    attempt add up, the peaks are the largest of any attempt, and ``attempts`` says how many there were."""
    total, peaks, processes, marks = 0.0, dict[str, float](), dict[str, float](), list[tuple[float, int]]()
    for attempt in range(retries + 1):
        job = run_job(module, config, overrides, log=log.with_suffix(f".{attempt}.log") if attempt else log,
                      interval=interval, kill_when=kill_when, progress=progress)  # fmt: skip
        marks += [(total + t, n) for t, n in job.progress]
        total += job.seconds
        peaks = {k: max(v, peaks.get(k, 0.0)) for k, v in {**peaks, **job.peaks}.items()}
        processes.update(job.processes)
        if job.returncode == 0 or job.killed or RAY_START_TIMEOUT not in Path(job.log).read_text()[-5000:]:
            break
    return JobRun(round(total, 2), job.returncode, peaks, processes, job.killed, job.log, attempt + 1, marks)


def check_job(job: JobRun, what: str) -> None:
    if job.returncode != 0 and not job.killed:
        tail = Path(job.log).read_text()[-3000:]
        raise RuntimeError(f"{what} failed (exit {job.returncode}); log {job.log}:\n{tail}")


def committed_chunks(out: Path) -> int:
    return len(list((out / "_manifest").glob("chunk-*.json")))


def output_ids(out: Path) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """(preference ids, (reject id, reason)) of a generation output folder."""
    prefs = Counter(r["id"] for r in iter_column_rows(out / "preferences", ["id"]))
    rejects = Counter((r["id"], r["reason"]) for r in iter_column_rows(out / "rejects", ["id", "reason"]))
    return prefs, rejects


def exactly_once(out: Path, input_ids: Sequence[str]) -> dict[str, Any]:
    """Every input row comes out once, as a preference or a reject (a repeated input id comes out once per
    occurrence: its first as usual, the rest as ``duplicate_id`` rejects)."""
    prefs, rejects = output_ids(out)
    got = prefs + Counter(i for i, _ in rejects.elements())
    wanted = Counter(input_ids)
    missing, extra = wanted - got, got - wanted
    return {"exactly_once": not missing and not extra, "rows": sum(wanted.values()),
            "preferences": sum(prefs.values()), "rejects": sum(rejects.values()),
            "missing": sorted(missing)[:10], "duplicated": sorted(extra)[:10]}  # fmt: skip


def generation_summary(out: Path) -> dict[str, Any]:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}
