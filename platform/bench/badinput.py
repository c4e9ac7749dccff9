"""Bad input at scale (``python -m jobs.benchmark badinput``): a SynthMed input with a share of corrupted rows,
generation killed once mid-run and resumed; every good id must come out exactly once and every bad id as a
reject with its reason.

The input: ``rows`` SynthMed samples, of which ``bad_fraction`` are corrupted in turn as

    unreadable_image   the image bytes are not an image
    truncated_image    a PNG cut in half
    empty_question     the question is blank
    empty_answer       the answer is empty
    image_too_large    a 8000 × 8000 PNG (64 Mpixel, over data.max_image_pixels by its header)
    duplicate_id       the id of an earlier row (that row stays good; this occurrence is the bad one)

``jobs.generate`` (tiny profile, the tests' tiny toy model) runs as its own process; once ``kill_at`` of its
chunks are committed the whole process group is SIGKILLed (driver, its Ray, its actors), then the same command
runs again to the end. Reported: whether the kill happened mid-run, exactly-once over every input row, bad rows
found in rejects with the expected reason (and any that were not), good rows rejected for model reasons (the
tiny model finds no replacement for some), the summary's count per reason and whether it matches the rejects.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hscr_platform.bench import runs
from hscr_platform.core.io import shard_files
from hscr_platform.models.toy import ToyModelConfig

KINDS = ("unreadable_image", "truncated_image", "empty_question", "empty_answer", "image_too_large", "duplicate_id")


@dataclass(frozen=True, kw_only=True)
class BadInputBenchConfig:
    rows: int = 10_000
    bad_fraction: float = 0.01
    workdir: str = "runs/bench/badinput"
    rows_per_shard: int = 2048
    chunk_rows: int = 256
    kill_at: float = 0.5  # share of chunks committed when the driver is killed
    seed: int = 0
    generate: tuple[str, ...] = ()  # extra overrides of jobs/configs/generate/tiny.yaml
    model: ToyModelConfig = field(default_factory=runs.tiny_model)

    def __post_init__(self) -> None:
        if self.rows < 2 * len(KINDS) or not 0 < self.bad_fraction < 0.5 or not 0 < self.kill_at < 1:
            raise ValueError(f"need rows >= {2 * len(KINDS)}, 0 < bad_fraction < 0.5 and 0 < kill_at < 1")


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8000, 8000), color=0).save(buf, format="PNG")  # ~60 KB on disk, 64 Mpixel by its header
    return buf.getvalue()


def corrupt(row: dict[str, Any], kind: str, *, earlier_id: str, big_png: bytes) -> dict[str, Any]:
    """``row`` made bad in one way (see the module docstring)."""
    row = dict(row)
    if kind == "unreadable_image":
        row["image"] = b"this is not an image"
    elif kind == "truncated_image":
        row["image"] = row["image"][: len(row["image"]) // 2]
    elif kind == "empty_question":
        row["question"] = "   "
    elif kind == "empty_answer":
        row["answer"] = ""
    elif kind == "image_too_large":
        row["image"] = big_png
    elif kind == "duplicate_id":
        row["id"] = earlier_id
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return row


def write_bad_input(clean: Path, folder: Path, *, fraction: float, seed: int) -> tuple[list[str], list[tuple]]:
    """Copy ``clean`` shard by shard, corrupting a seeded ``fraction`` of rows (never the first).

    Returns (every row's id in input order, [(row position, id, expected reason)] of the bad rows).
    """
    rng, big = np.random.default_rng(seed), _big_png()
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_files(clean))
    positions = sorted(rng.choice(np.arange(1, total), size=max(len(KINDS), round(total * fraction)), replace=False))
    kind_at = {int(p): KINDS[k % len(KINDS)] for k, p in enumerate(positions)}
    ids: list[str] = []
    bad: list[tuple] = []
    pos = 0
    folder.mkdir(parents=True, exist_ok=True)
    for path in shard_files(clean):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            kind = kind_at.get(pos)
            if kind is not None:
                rows[i] = corrupt(row, kind, earlier_id=ids[int(rng.integers(0, len(ids)))], big_png=big)
                bad.append((pos, rows[i]["id"], kind))
            ids.append(rows[i]["id"])
            pos += 1
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), folder / path.name)
    return ids, bad


def check_rejects(out: Path, bad: list[tuple]) -> dict[str, Any]:
    """Every bad row among the rejects with its expected reason; the reasons of the other rejects."""
    _, rejects = runs.output_ids(out)
    found = Counter((i, reason) for _, i, reason in bad)
    missing = [(i, reason) for (i, reason), n in found.items() if rejects[(i, reason)] < n]
    data_reasons = Counter(reason for _, _, reason in bad)
    other = Counter(reason for (_, reason), n in rejects.items() for _ in range(n)) - data_reasons
    return {"bad_rows": len(bad), "bad_rows_by_kind": dict(data_reasons), "bad_found": not missing,
            "bad_missing": missing[:10], "other_rejects_by_reason": dict(other)}  # fmt: skip


def _killer(out: Path, kill_at: float) -> Any:
    def due() -> bool:
        manifest = out / "_manifest" / "run.json"
        if not manifest.is_file():
            return False
        chunks = json.loads(manifest.read_text())["chunks"]
        return runs.committed_chunks(out) >= max(1, int(chunks * kill_at))

    return due


def run(cfg: BadInputBenchConfig) -> dict[str, Any]:
    """Make the bad input, run generation with one kill, resume, check; the JSON ``jobs.benchmark`` prints."""
    work = Path(cfg.workdir).resolve()
    clean = runs.synthmed_rows(work / f"synthmed-{cfg.rows}", cfg.rows, rows_per_shard=cfg.rows_per_shard)
    model = runs.build_model(work / "model", clean, cfg.model)
    inputs, out = work / "input", work / "generate"
    shutil.rmtree(inputs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    ids, bad = write_bad_input(clean, inputs, fraction=cfg.bad_fraction, seed=cfg.seed)
    overrides = [f"data.input={inputs}", f"model.path={model}", f"output.path={out}",
                 f"data.chunk_rows={cfg.chunk_rows}", "compute.batch_size=16", "tracking.enabled=false",
                 *cfg.generate]  # fmt: skip
    first = runs.run_job_retrying("jobs.generate", "jobs/configs/generate/tiny.yaml", overrides,
                                  log=work / "first.log", kill_when=_killer(out, cfg.kill_at))  # fmt: skip
    runs.check_job(first, "jobs.generate (first run)")
    at_kill = runs.committed_chunks(out)
    second = runs.run_job_retrying("jobs.generate", "jobs/configs/generate/tiny.yaml", overrides,
                                   log=work / "resume.log")  # fmt: skip
    runs.check_job(second, "jobs.generate (resumed run)")
    summary = runs.generation_summary(out)
    _, rejects = runs.output_ids(out)
    table_reasons = Counter(reason for (_, reason), n in rejects.items() for _ in range(n))
    return {
        "benchmark": "badinput",
        "rows": len(ids),
        "killed": first.killed,
        "killed_mid_run": first.killed and 0 < at_kill < summary.get("chunks", 0),
        "chunks_committed_at_kill": at_kill,
        "chunks": summary.get("chunks"),
        **runs.exactly_once(out, ids),
        **check_rejects(out, bad),
        "summary_reject_reasons": summary.get("reject_reasons"),
        "summary_matches_rejects": dict(table_reasons) == dict(summary.get("reject_reasons", {})),
        "seconds": {"first": first.seconds, "resume": second.seconds},
        "peak_rss_mib": {"first": first.peaks, "resume": second.peaks},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }
