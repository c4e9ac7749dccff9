"""The ingest job: read a source dataset, validate every row, write samples and rejects as parquet datasets.

    <output.path>/samples/part-*.parquet    SAMPLE_SCHEMA rows that passed validate_sample
    <output.path>/rejects/part-*.parquet    REJECT_SCHEMA rows: id, source, reason, detail
    <output.path>/summary.json              rows read, samples written, rejects by reason, images windowed (last)
    <output.path>/config.yaml               the resolved config

Streaming and constant memory: rows go one at a time from the reader through validation into ShardWriters that
hold at most ``rows_per_shard`` rows. Shards are written into a hidden staging folder inside the output folder
and moved into place only when the whole source was read, so a failed run leaves earlier results untouched.
High-bit-depth images (16-bit PNG scans, PIL modes I;16 / I / F) are written as 8-bit grayscale PNGs windowed by
their own min..max (``hscr_platform.data.images``, the same function every engine's ``open_image`` uses); the
row's ``meta`` records the source mode and window under ``"image_8bit"``.
The job writes into the output folder only, refuses a non-empty one unless ``overwrite`` (which replaces only
samples/, rejects/, summary.json and config.yaml), and refuses an output folder that overlaps the source.
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow.parquet as pq
from tqdm import tqdm

from hscr_platform.core.config import save_config
from hscr_platform.core.io import ShardWriter
from hscr_platform.core.preflight import check_exists, check_writable, require
from hscr_platform.data.images import png_8bit
from hscr_platform.data.readers import SourceConfig, read_source
from hscr_platform.data.samples import RawRow, Reject, validate_sample
from hscr_platform.data.schema import REJECT_SCHEMA, SAMPLE_SCHEMA

__all__ = ["IngestJobConfig", "LimitsConfig", "OutputConfig", "SourceConfig", "run"]

OUTPUTS: Final = ("samples", "rejects")
SUMMARY_FILE: Final = "summary.json"
CONFIG_FILE: Final = "config.yaml"


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where the samples/ and rejects/ datasets go."""

    path: str
    rows_per_shard: int = 1024  # rows buffered per shard: memory ~ rows_per_shard x image size
    overwrite: bool = False  # replace an earlier ingest's outputs in a non-empty folder

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ValueError("path must not be empty")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What an image may cost: bigger ones are rejected (image_too_large) before they are decoded."""

    max_image_pixels: int = 50_000_000  # width x height, read from the header
    max_image_bytes: int = 32 * 1024 * 1024  # encoded size

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            raise ValueError("max_image_pixels and max_image_bytes must be >= 1")


@dataclass(frozen=True, kw_only=True)
class IngestJobConfig:
    """Ingest a medical VQA dataset into samples/ and rejects/ parquet datasets."""

    source: SourceConfig
    output: OutputConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def run(cfg: IngestJobConfig) -> dict[str, Any]:
    """Ingest ``cfg.source`` into ``cfg.output.path``; print and return the summary."""
    started = time.monotonic()
    preflight(cfg)
    rows = read_source(cfg.source)  # FileNotFoundError now, before the output folder is touched
    out = Path(cfg.output.path)
    _check_output(out, Path(cfg.source.path), overwrite=cfg.output.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=out))
    try:
        counts = _ingest(rows, cfg, staging)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "source": {"format": cfg.source.format, "path": cfg.source.path},
        "output": str(out),
        **counts,
        "seconds": round(time.monotonic() - started, 2),
    }
    save_config(cfg, out / CONFIG_FILE)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return summary


def preflight(cfg: IngestJobConfig) -> None:
    """The source, its image folder and the output folder, all checked (and every problem listed) up front."""
    checks = [("source.path", lambda: check_exists(cfg.source.path, "source"))]
    if cfg.source.image_dir is not None:
        checks.append(("source.image_dir", lambda: check_exists(str(cfg.source.image_dir), "image folder")))
    checks.append(("output.path", lambda: check_writable(cfg.output.path)))
    require(checks, job="ingest")


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the few lines the job prints."""
    lines = [
        f"ingest {summary['source']['format']} from {summary['source']['path']}",
        f"  rows read        {summary['rows_read']}",
        f"  samples written  {summary['samples_written']}",
        f"  rejects written  {summary['rejects_written']}",
        f"  images windowed  {summary['images_windowed']} (high-bit-depth -> 8-bit)",
    ]
    by_reason = summary["rejects_by_reason"]
    lines.append("  rejects by reason" + ("" if by_reason else ": none"))
    lines += [f"    {reason:<18} {n}" for reason, n in by_reason.items()]
    lines.append(f"  output           {summary['output']}")
    return "\n".join(lines)


def _ingest(rows: Iterable[RawRow | Reject], cfg: IngestJobConfig, staging: Path) -> dict[str, Any]:
    """Stream rows -> validate -> staging/samples and staging/rejects; the counts."""
    seen_ids: set[str] = set()
    reasons: collections.Counter[str] = collections.Counter()
    windowed = 0
    per_shard = cfg.output.rows_per_shard
    with (
        ShardWriter(staging / "samples", SAMPLE_SCHEMA, rows_per_shard=per_shard) as samples,
        ShardWriter(staging / "rejects", REJECT_SCHEMA, rows_per_shard=per_shard) as rejects,
    ):
        for item in tqdm(rows, desc=f"ingest {cfg.source.format}", unit="row", disable=None):
            reject = item if isinstance(item, Reject) else _validate(item, cfg, seen_ids)
            if reject is None:
                windowed += _window_high_bit_depth(item)
                samples.write(item)
            else:
                reasons[reject.reason] += 1
                rejects.write(reject.as_row())
    for writer in (samples, rejects):
        if writer.rows_written == 0:  # an empty dataset is still a readable one, with its schema
            pq.write_table(writer.schema.empty_table(), writer.folder / "part-00000.parquet")
    return {
        "rows_read": samples.rows_written + rejects.rows_written,
        "samples_written": samples.rows_written,
        "rejects_written": rejects.rows_written,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "images_windowed": windowed,
    }


def _window_high_bit_depth(row: RawRow) -> bool:
    """Replace a validated row's high-bit-depth image by its 8-bit PNG (min..max window); True if it did."""
    converted = png_8bit(row["image"])
    if converted is None:
        return False
    row["image"], done = converted
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    meta = meta if isinstance(meta, dict) else {"meta": meta}
    row["meta"] = json.dumps({**meta, "image_8bit": done}, ensure_ascii=False)
    return True


def _validate(row: dict[str, Any], cfg: IngestJobConfig, seen_ids: set[str]) -> Reject | None:
    limits = cfg.limits
    return validate_sample(
        row,
        max_image_pixels=limits.max_image_pixels,
        max_image_bytes=limits.max_image_bytes,
        seen_ids=seen_ids,
    )


def _check_output(out: Path, source: Path, *, overwrite: bool) -> None:
    """Refuse an output that would mix with other data or with the source itself."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output.path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty; set output.overwrite=true to replace its outputs")
    out_abs, source_abs = out.resolve(), source.resolve()
    if out_abs == source_abs or source_abs in out_abs.parents:
        raise ValueError(f"output folder {out} is inside the source {source}; write it elsewhere")
    if any(out_abs / name == source_abs or out_abs / name in source_abs.parents for name in OUTPUTS):
        raise ValueError(f"source {source} is inside the output's {'/'.join(OUTPUTS)}; it would be replaced")


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace the output's samples/ and rejects/ shards by the staged ones (other files are left alone)."""
    for name in OUTPUTS:
        final = out / name
        if final.is_dir():
            for old in final.glob("part-*.parquet*"):
                old.unlink()
        final.mkdir(exist_ok=True)
        for shard in sorted((staging / name).glob("part-*.parquet")):
            shard.replace(final / shard.name)
    for name in (SUMMARY_FILE, CONFIG_FILE):
        (out / name).unlink(missing_ok=True)
