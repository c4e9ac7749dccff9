"""The generation pipeline's Ray Data graph, its stage actors, and the per-chunk commit + manifest.

    chunk descriptors -> read + validate (tasks) -> [fused actor | scorer -> decoder -> finisher actors
                                                      | vLLM score + decode actors -> finisher actors]
                      -> driver: gather each chunk's rows, commit the chunk atomically, log progress

Rows travel between stages as ``(chunk, row, state)`` with ``state`` a pickled dict (``generate_worker``),
so no intermediate schema has to be kept in sync. Each actor holds one :class:`Worker` (models loaded once
per actor). Every chunk stays one block from the read task to the driver. A chunk is committed by writing its
preference and reject shards (temporary file + rename), then its manifest entry; a rerun skips committed
chunks and deletes shards of uncommitted ones.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.core.config import save_config
from hscr_platform.data.schema import PREFERENCE_ROW_GROUP, PREFERENCE_SCHEMA, REJECT_SCHEMA
from hscr_platform.generation.job import GenDataConfig, GenerateJobConfig, generation_hash
from hscr_platform.generation.plan import ChunkPlan, chunk_descriptor
from hscr_platform.generation.summary import by_question_type, merge_by_question_type

if TYPE_CHECKING:  # the worker module (models, engines) is imported by the actors only
    from hscr_platform.generation.worker import WorkerSpec


# --- input: chunks, reading, validation ------------------------------------------------------------------

INPUT_COLUMNS = ("id", "source", "split", "image", "question", "answer", "answer_type", "question_type")
TEXT_COLUMNS = tuple(c for c in INPUT_COLUMNS if c != "image")
INVALID_UTF8 = "invalid_utf8"  # a text field is not valid UTF-8 (reject reason)


def _read_range(path: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a shard, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    columns = [c for c in INPUT_COLUMNS if c in pf.schema_arrow.names]
    groups, offset, first = [], 0, None
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            first = offset if first is None else first
            groups.append(g)
        offset += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), stop - start)


def _raw_row(values: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Text fields decoded from bytes; the name of the first field that is not UTF-8, if any."""
    row: dict[str, Any] = {c: None for c in INPUT_COLUMNS}
    row["image"] = values.get("image")
    bad = None
    for name in TEXT_COLUMNS:
        raw = values.get(name)
        try:
            row[name] = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            bad = bad or name
    return row, bad


def validate_row(values: dict[str, Any], *, chunk: dict[str, Any], offset: int, data: GenDataConfig) -> dict:
    """A pipeline state: the sample ready to score, or a ``reject`` with a reason (never raises)."""
    from hscr_platform.data.samples import DUPLICATE_ID, validate_sample

    row, bad = _raw_row(values)
    position = chunk["first_row"] + offset
    row_id = row["id"] if isinstance(row["id"], str) and row["id"] else f"row:{position}"
    state = {**row, "id": row_id, "chunk": chunk["index"], "row": position}
    if bad is not None:
        reason, detail = INVALID_UTF8, f"{bad} is not valid UTF-8"
    elif offset in chunk["duplicates"]:
        reason, detail = DUPLICATE_ID, f"id {row_id!r} appeared earlier in the input (the first row is used)"
    else:
        found = validate_sample(
            row, max_image_pixels=data.max_image_pixels, max_image_bytes=data.max_image_bytes, seen_ids=set()
        )
        if found is None:
            return {**state, "image": row["image"]}
        reason, detail = found.reason, found.detail
    rejected = {"id": row_id, "source": str(row.get("source") or ""), "reason": reason, "detail": detail}
    return {"chunk": chunk["index"], "row": position, "id": row_id, "reject": rejected,
            "question_type": row.get("question_type")}  # fmt: skip


def read_chunk_batch(table: pa.Table, *, data: GenDataConfig) -> pa.Table:
    """Ray Data task: chunk descriptors -> one validated state per input row."""
    states = []
    for chunk in table.to_pylist():
        rows = _read_range(chunk["file"], chunk["start"], chunk["stop"])
        for name in TEXT_COLUMNS:  # strings as bytes: one non-UTF-8 value must not fail the whole chunk
            if name in rows.column_names and pa.types.is_string(rows.schema.field(name).type):
                rows = rows.set_column(rows.column_names.index(name), name, rows.column(name).cast(pa.binary()))
        states += [validate_row(v, chunk=chunk, offset=o, data=data) for o, v in enumerate(rows.to_pylist())]
    return pack(states)


# --- Ray Data stages -----------------------------------------------------------------------------------


def pack(states: Sequence[dict]) -> pa.Table:
    """States as a table of (chunk, row, pickled state): no schema to keep in sync between stages."""
    return pa.table(
        {
            "chunk": pa.array([s["chunk"] for s in states], pa.int64()),
            "row": pa.array([s["row"] for s in states], pa.int64()),
            "state": pa.array([pickle.dumps(s, protocol=5) for s in states], pa.binary()),
        }
    )


def unpack(table: pa.Table) -> list[dict]:
    return [pickle.loads(blob) for blob in table.column("state").to_pylist()]


def _final(state: dict) -> dict:
    """What the driver needs of a finished row (drops the intermediate scoring / decoding state)."""
    keep = "preference" if "preference" in state else "reject"
    return {
        "chunk": state["chunk"],
        "row": state["row"],
        keep: state[keep],
        "question_type": state.get("question_type"),
    }


class StageActor:
    """A Ray Data callable class: loads a Worker once, then runs its stages on every batch it is given."""

    parts: tuple[str, ...] = ()

    def __init__(self, spec: WorkerSpec):
        from hscr_platform.generation.worker import Worker

        self.worker = Worker(spec, parts=self.parts)

    def __call__(self, table: pa.Table) -> pa.Table:
        states = unpack(table)
        for part in self.parts:
            self.worker.run(states, part)
        if "finish" in self.parts:
            states = [_final(s) for s in states]
        return pack(states)


class FusedActor(StageActor):
    parts = ("score", "decode", "finish")


class ScoreActor(StageActor):
    parts = ("score",)


class DecodeActor(StageActor):
    parts = ("decode",)


class FinishActor(StageActor):
    parts = ("finish",)


class ScoreDecodeActor(StageActor):
    """The ``vllm`` layout's engine actor: one vLLM engine scores both views and decodes every level."""

    parts = ("score", "decode")


def layout_stages(c: Any) -> list[tuple[type[StageActor], Any]]:
    """(actor class, pool config) of each stage of ``compute.layout``, in order."""
    if c.layout == "fused":
        return [(FusedActor, c.fused)]
    if c.layout == "vllm":
        return [(ScoreDecodeActor, c.decoder), (FinishActor, c.finisher)]
    return [(ScoreActor, c.scorer), (DecodeActor, c.decoder), (FinishActor, c.finisher)]


def build_dataset(cfg: GenerateJobConfig, plan: ChunkPlan, todo: Sequence[int], spec: WorkerSpec) -> Any:
    """chunk descriptors -> read/validate tasks -> actor pool(s); one block per chunk throughout."""
    import ray.data

    items = [chunk_descriptor(plan.chunks[i]) for i in todo]
    ds: Any = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_chunk_batch,
        fn_kwargs={"data": cfg.data},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cfg.compute.read_cpus,
    )
    for actor, pool in layout_stages(cfg.compute):
        gpus = {"num_gpus": pool.gpus} if pool.gpus else {}
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={"spec": spec},
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            **gpus,
        )
    return ds


# --- commit + manifest -----------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write to ``<path>.tmp``, fsync, rename: readers never see a half-written file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def _write_json(path: Path, record: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(record, indent=1, sort_keys=True)))


def commit_chunk(out: Path, index: int, states: Sequence[dict]) -> dict[str, Any]:
    """Write a chunk's preference and reject shards, then (last) its manifest entry; returns the entry."""
    ordered = sorted(states, key=lambda s: s["row"])
    prefs = [s["preference"] for s in ordered if "preference" in s]
    rejects = [s["reject"] for s in ordered if "reject" in s]
    name = f"part-{index:05d}.parquet"
    for folder, rows, schema in (
        ("preferences", prefs, PREFERENCE_SCHEMA),
        ("rejects", rejects, REJECT_SCHEMA),
    ):
        if rows:
            table = pa.Table.from_pylist(rows, schema=schema)
            _write_atomic(out / folder / name, partial(pq.write_table, table, row_group_size=PREFERENCE_ROW_GROUP))
    entry = {
        "chunk": index,
        "rows": len(ordered),
        "preferences": len(prefs),
        "rejects": len(rejects),
        "reject_reasons": dict(Counter(r["reason"] for r in rejects)),
        "num_levels": dict(Counter(str(p["num_levels"]) for p in prefs)),
        "level_m": dict(Counter(str(len(ps)) for p in prefs for ps in p["replaced_positions"])),
        "by_question_type": by_question_type(ordered),
    }
    _write_json(out / "_manifest" / f"chunk-{index:05d}.json", entry)
    return entry


def committed_chunks(out: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (out / "_manifest").glob("chunk-*.json")}


def open_output(out: Path, cfg: GenerateJobConfig, plan: ChunkPlan) -> set[int]:
    """Start or resume ``out``: refuse another config's or input's folder; drop uncommitted leftovers."""
    record = {
        "config_hash": generation_hash(cfg),
        "input_fingerprint": plan.fingerprint,
        "chunks": len(plan.chunks),
        "rows": plan.rows,
    }
    run_file = out / "_manifest" / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        for key, what in (("config_hash", "generation config"), ("input_fingerprint", "input data")):
            if old[key] != record[key]:
                raise ValueError(
                    f"output.path {out} was made by a different {what} ({old[key]} != {record[key]}); "
                    "use a new output.path"
                )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"output.path {out} is not empty and holds no generation run; use a new output.path")
    else:
        save_config(cfg, out / "config.yaml")
        _write_json(run_file, record)
    committed = committed_chunks(out)
    for folder in ("preferences", "rejects"):
        for path in (out / folder).glob("part-*"):
            if path.name.endswith(".tmp") or int(path.name[5:10]) not in committed:
                path.unlink()  # written by a run killed before its manifest entry: redone below
    return committed


def manifest_entries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_manifest").glob("chunk-*.json"))]


def summarize(out: Path, plan: ChunkPlan, *, status: str, seconds: float, earlier: set[int]) -> dict[str, Any]:
    """Totals over every committed chunk (this run's and ``earlier`` ones), also written to summary.json."""
    entries = manifest_entries(out)
    new_rows = sum(e["rows"] for e in entries if e["chunk"] not in earlier)
    totals: dict[str, Counter[str]] = {k: Counter() for k in ("reject_reasons", "num_levels", "level_m")}
    for entry in entries:
        for key, counter in totals.items():
            counter.update(entry[key])
    rows = sum(e["rows"] for e in entries)
    summary = {
        "status": status,
        "output": str(out),
        "rows": rows,
        "input_rows": plan.rows,
        "preferences": sum(e["preferences"] for e in entries),
        "rejects": sum(e["rejects"] for e in entries),
        "chunks": len(plan.chunks),
        "chunks_committed": len(entries),
        "seconds": round(seconds, 2),
        "rows_this_run": new_rows,
        "examples_per_s": round(new_rows / max(seconds, 1e-9), 3),
        **{key: dict(sorted(counter.items())) for key, counter in totals.items()},
        "by_question_type": merge_by_question_type(entries),
    }
    _write_json(out / "summary.json", summary)
    return summary
