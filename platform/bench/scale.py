"""Scale run (``python -m jobs.benchmark scale --rows 10000 50000 100000``): SynthMed at each size streamed
through ``jobs.generate`` and one epoch of ``jobs.train``, with rows/s and the peak RSS of every process.

Per size N: SynthMed makes N training samples (untimed); ``jobs.generate`` (tiny profile, the tests' tiny toy
model) turns them into preference shards; ``jobs.train`` (tiny profile) trains one epoch on them. Each job is its
own process with its own private local Ray; the RSS of the job's driver and of every descendant (Ray system
processes, actors, Train workers, named by Ray's ``ray::<name>`` process titles) is sampled every
``sample_interval`` s while it runs. Reported per size: wall seconds and rows/s of each job and end to end, the
peak RSS per role, exactly-once of the generation output, the training steps, and bytes of preference data.
Across sizes: ``rss_ratio`` = the largest run's peak RSS over the smallest run's, for the job's own process (a
driver, actor or worker) where that ratio is worst (every role's ratio, Ray's daemons included, is in
``rss_ratio_by_role``); ``throughput_ratio`` = end-to-end rows/s of the largest run over the smallest's, and
``steady_throughput_ratio`` the same once the jobs run (between their first and last progress marks: committed
generation chunks, training steps), since Ray's and the model's start-up weigh on a small run only;
``exactly_once`` = every size's output had every input id exactly once. A PNG plots peak RSS against rows per
role. The data and outputs stay under ``workdir`` unless ``keep=false``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hscr_platform.bench import runs
from hscr_platform.models.toy import ToyModelConfig

GLOBAL_BATCH = 16  # training's global batch in the scale run


@dataclass(frozen=True, kw_only=True)
class ScaleBenchConfig:
    rows: tuple[int, ...] = (10_000, 50_000, 100_000)
    workdir: str = "runs/bench/scale"
    rows_per_shard: int = 4096  # SynthMed input shards
    chunk_rows: int = 512  # generation's commit unit
    generate: tuple[str, ...] = ()  # extra key=value overrides of jobs/configs/generate/tiny.yaml
    train: tuple[str, ...] = ()  # extra key=value overrides of jobs/configs/train/tiny.yaml
    sample_interval: float = 1.0  # seconds between RSS samples
    keep: bool = True  # keep each size's SynthMed data and outputs under workdir
    model: ToyModelConfig = field(default_factory=runs.tiny_model)

    def __post_init__(self) -> None:
        if not self.rows or min(self.rows) < 1:
            raise ValueError(f"rows: give one or more sizes >= 1, got {self.rows}")


def _generate(cfg: ScaleBenchConfig, samples: Path, model: Path, out: Path, logs: Path) -> runs.JobRun:
    overrides = [f"data.input={samples}", f"model.path={model}", f"output.path={out}",
                 f"data.chunk_rows={cfg.chunk_rows}", "compute.batch_size=16", "tracking.enabled=false",
                 *cfg.generate]  # fmt: skip
    job = runs.run_job_retrying("jobs.generate", "jobs/configs/generate/tiny.yaml", overrides,
                                log=logs / "generate.log", interval=cfg.sample_interval,
                                progress=lambda: runs.committed_chunks(out) * cfg.chunk_rows)  # fmt: skip
    runs.check_job(job, "jobs.generate")
    return job


def _train(cfg: ScaleBenchConfig, prefs: Path, model: Path, root: Path, logs: Path) -> tuple[runs.JobRun, dict]:
    overrides = [f"data.path={prefs}", f"policy.path={model}", f"output.root={root}", "output.name=scale",
                 "schedule.epochs=1", "schedule.max_steps=null", "schedule.checkpoint_every=1000000",
                 "schedule.log_every=25", "batch.micro_batch_size=8", "batch.grad_accum=1",
                 f"batch.global_batch_size={GLOBAL_BATCH}", "data.shuffle_window=256", "tracking.enabled=false",
                 *cfg.train]  # fmt: skip
    steps = runs.last_number(logs / "train.log", r"\[train\] step (\d+)/")  # printed every log_every steps
    job = runs.run_job_retrying("jobs.train", "jobs/configs/train/tiny.yaml", overrides, log=logs / "train.log",
                                interval=cfg.sample_interval, progress=lambda: steps() * GLOBAL_BATCH)  # fmt: skip
    runs.check_job(job, "jobs.train")
    done = root / "train" / "scale" / "summary.json"
    return job, json.loads(done.read_text()) if done.is_file() else {}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("part-*.parquet"))


def bytes_per_worker(prefs: Path, *, workers: int = 2, micro: int = 8, global_batch: int = 16,
                     window: int = 256) -> dict[str, Any]:  # fmt: skip
    """Bytes each training worker reads from the preference shards in one epoch (the training loop's own
    stream, ``pref_stream.iter_micro_batches``, with a ``ReadCounter``), and its share of the shards' bytes."""
    from hscr_platform.training.pref_data import PrefDataConfig
    from hscr_platform.training.pref_stream import ReadCounter, Slicing, dataset_layout, iter_micro_batches

    layout = dataset_layout(prefs)
    steps = layout.total // global_batch
    cfg, total = PrefDataConfig(path=str(prefs), shuffle_window=window), _bytes(prefs)
    per_worker = []
    for rank in range(workers):
        counter = ReadCounter()
        stream = iter_micro_batches(layout, cfg, Slicing(rank=rank, world=workers, micro=micro), seed=0,
                                    start_step=0, steps_per_epoch=steps, global_batch=global_batch,
                                    counter=counter)  # fmt: skip
        for _ in range(steps * global_batch // (workers * micro)):
            next(stream)
        per_worker.append(counter.bytes)
    return {"workers": workers, "shard_bytes": total, "bytes_read": per_worker,
            "share": [round(b / total, 3) for b in per_worker]}  # fmt: skip


def run_size(cfg: ScaleBenchConfig, n: int, model_spec: ToyModelConfig) -> dict[str, Any]:
    """One size end to end: data, generation, one training epoch; the numbers of each."""
    base = Path(cfg.workdir).resolve() / f"rows-{n}"
    samples = runs.synthmed_rows(base / "synthmed", n, rows_per_shard=cfg.rows_per_shard)
    model = runs.build_model(Path(cfg.workdir).resolve() / "model", samples, model_spec)
    out, logs = base / "generate", base / "logs"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(base / "train", ignore_errors=True)
    gen = _generate(cfg, samples, model, out, logs)
    input_ids = [r["id"] for r in runs.iter_column_rows(samples, ["id"])]
    check = runs.exactly_once(out, input_ids)
    train, summary = _train(cfg, out / "preferences", model, base, logs)
    total = gen.seconds + train.seconds
    gen_steady, train_steady = runs.steady_rate(gen.progress), runs.steady_rate(train.progress)
    steady = 1 / (1 / gen_steady + 1 / train_steady) if gen_steady and train_steady else None
    peaks = {f"generate/{k}": v for k, v in gen.peaks.items()} | {f"train/{k}": v for k, v in train.peaks.items()}
    result = {
        "rows": n, "exactly_once": check["exactly_once"], "output": check,
        "generate": {"seconds": gen.seconds, "rows_per_s": round(n / gen.seconds, 2), "attempts": gen.attempts,
                     "job_summary_seconds": runs.generation_summary(out).get("seconds"),
                     "steady_rows_per_s": gen_steady},
        "train": {"seconds": train.seconds, "steps": summary.get("steps"), "attempts": train.attempts,
                  "rows_per_s": round(check["preferences"] / train.seconds, 2),
                  "steady_rows_per_s": train_steady},
        "rows_per_s": round(n / total, 2),
        "steady_rows_per_s": round(steady, 2) if steady else None,
        "peak_rss_mib": peaks,
        "processes": {"generate": gen.processes, "train": train.processes},
        "bytes": {"samples": _bytes(samples), "preferences": _bytes(out / "preferences")},
        "train_bytes_per_worker": bytes_per_worker(out / "preferences"),
    }  # fmt: skip
    if not cfg.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


def job_roles(peaks: dict[str, float]) -> list[str]:
    """The roles the run itself owns: each job's driver and its Ray actors and workers (``ray::*``), not Ray's
    own daemons (``system:*``) or short helper processes (``other``)."""
    return [r for r in peaks if r.split("/", 1)[1] == "driver" or r.split("/", 1)[1].startswith("ray::")]


def compare(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest size over smallest: peak RSS per role (``rss_ratio``: the worst of the job's own processes,
    the driver, actors and workers; Ray's daemons are in ``rss_ratio_by_role`` too) and rows/s, end to end
    (``throughput_ratio``) and once running (``steady_throughput_ratio``: start-up and shutdown left out)."""
    small, large = min(sizes, key=lambda s: s["rows"]), max(sizes, key=lambda s: s["rows"])
    roles = sorted(set(small["peak_rss_mib"]) & set(large["peak_rss_mib"]))
    by_role = {r: round(large["peak_rss_mib"][r] / small["peak_rss_mib"][r], 3) for r in roles}
    own = job_roles(by_role)
    worst = max(own, key=lambda r: by_role[r]) if own else None
    steady = (round(large["steady_rows_per_s"] / small["steady_rows_per_s"], 3)
              if large.get("steady_rows_per_s") and small.get("steady_rows_per_s") else None)  # fmt: skip
    return {
        "rss_ratio": by_role[worst] if worst else None,
        "rss_ratio_role": worst,
        "throughput_ratio": round(large["rows_per_s"] / small["rows_per_s"], 3),
        "steady_throughput_ratio": steady,
        "exactly_once": all(s["exactly_once"] for s in sizes),
        "rss_ratio_by_role": by_role,
    }


def plot(sizes: list[dict[str, Any]], path: Path) -> Path:
    """Peak RSS against rows, one panel per job, one line per process the job owns (driver, actors, workers;
    Ray's daemons are in the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
    for ax, job in zip(axes, ("generate", "train"), strict=True):
        roles = sorted({r for s in sizes for r in job_roles(s["peak_rss_mib"]) if r.startswith(f"{job}/")})
        for k, role in enumerate(roles):
            points = [(s["rows"], s["peak_rss_mib"][role]) for s in sizes if role in s["peak_rss_mib"]]
            ax.plot(*zip(*points, strict=True), marker="o", linestyle=("-", "--", ":")[k // 10],
                    label=role.split("/", 1)[1])  # fmt: skip
        ax.set(xlabel="rows", title=f"jobs.{job}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("peak RSS (MiB)")
    fig.suptitle("peak RSS per process against rows")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(cfg: ScaleBenchConfig) -> dict[str, Any]:
    """Every size in order; the JSON ``jobs.benchmark`` prints (the PNG goes next to the workdir's JSON)."""
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes: list[dict[str, Any]] = []
    for n in sorted(cfg.rows):
        sizes.append(run_size(cfg, n, cfg.model))
        (workdir / "sizes-so-far.json").write_text(json.dumps(sizes, indent=2))  # kept if a later size fails
    png = plot(sizes, workdir / "memory_vs_rows.png")
    return {"benchmark": "scale", **compare(sizes), "plot": str(png), "sizes": sizes,
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
            "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}  # fmt: skip
