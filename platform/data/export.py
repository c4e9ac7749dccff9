"""Export preference shards to the formats other trainers read (``python -m jobs.export``).

    python -m jobs.export input=<gen>/preferences format=trl output=<dir>     # TRL DPO (vision) parquet
    python -m jobs.export input=<gen>/preferences format=llava output=<dir>   # LLaVA-style JSON + image files

One output row per preference pair. ``pairs: explicit`` (default) gives (y_w, y_lj) for every kept level j
(the paper's explicit term); ``pairs: all`` adds the implicit pairs (y_li, y_lj), i < j, a less-wrong level
preferred to a more-wrong one. ``chosen_level`` / ``rejected_level`` say which (0 = y_w). Formats
(docs/DATA.md, "Exports"):

- trl: ``<output>/part-NNNNN.parquet`` with ``images`` (list of {bytes, path}), ``prompt`` / ``chosen`` /
  ``rejected`` in TRL's conversational form, plus ``id``, ``chosen_level``, ``rejected_level``. The files
  carry Hugging Face ``datasets`` feature metadata: ``load_dataset("parquet", ...)`` decodes ``images``.
- llava: ``<output>/llava.json`` (a JSON list: id, image, conversations, chosen, rejected, levels) and
  ``<output>/images/<name>.<png|jpeg>``, one file per example.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from hscr_platform.core.io import ShardWriter, iter_rows, shard_files

COLUMNS = ["id", "image", "question", "responses", "num_levels"]

_TEXT = pa.struct([("type", pa.string()), ("text", pa.string())])
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(_TEXT))]))
_VALUE = {"dtype": "string", "_type": "Value"}
_MESSAGES_FEATURE = [{"role": _VALUE, "content": [{"type": _VALUE, "text": _VALUE}]}]
HF_FEATURES = {  # what Hugging Face ``datasets`` reads from the parquet metadata (images decode as PIL)
    "id": _VALUE,
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    "prompt": _MESSAGES_FEATURE,
    "chosen": _MESSAGES_FEATURE,
    "rejected": _MESSAGES_FEATURE,
    "chosen_level": {"dtype": "int32", "_type": "Value"},
    "rejected_level": {"dtype": "int32", "_type": "Value"},
}
TRL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("prompt", _MESSAGES),
        ("chosen", _MESSAGES),
        ("rejected", _MESSAGES),
        ("chosen_level", pa.int32()),
        ("rejected_level", pa.int32()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)


@dataclass(frozen=True, kw_only=True)
class ExportJobConfig:
    """Export HSCR preference shards to TRL's preference format or LLaVA-style JSON."""

    input: str  # a folder of preference shards (<generate output>/preferences)
    format: Literal["trl", "llava"]
    output: str  # a new (or empty) folder
    pairs: Literal["explicit", "all"] = "explicit"  # all: also the implicit pairs between dispreferred levels
    rows_per_shard: int = 2048  # trl: pairs per parquet shard
    max_rows: int | None = None  # export only the first N preference rows
    overwrite: bool = False  # replace an existing non-empty output folder

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")


def preference_pairs(num_levels: int, *, pairs: str) -> list[tuple[int, int]]:
    """(chosen, rejected) response indices of one ranked list ``0 ≻ 1 ≻ ... ≻ num_levels``."""
    explicit = [(0, j) for j in range(1, num_levels + 1)]
    if pairs == "explicit":
        return explicit
    return explicit + [(i, j) for i in range(1, num_levels + 1) for j in range(i + 1, num_levels + 1)]


def _user(question: str) -> list[dict[str, Any]]:
    content = [{"type": "image", "text": None}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_rows(row: dict[str, Any], *, pairs: str) -> Iterator[dict[str, Any]]:
    """TRL's conversational preference rows (one per pair) for one preference row."""
    responses = row["responses"]
    for i, j in preference_pairs(row["num_levels"], pairs=pairs):
        yield {
            "id": f"{row['id']}#{i}-{j}",
            "images": [{"bytes": row["image"], "path": None}],
            "prompt": _user(row["question"]),
            "chosen": _assistant(responses[i]),
            "rejected": _assistant(responses[j]),
            "chosen_level": i,
            "rejected_level": j,
        }


def image_name(example_id: str, data: bytes) -> str:
    """A file name safe on any file system, unique per id, with the image's real extension."""
    from PIL import Image

    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)[:80]
    return f"{stem}-{hashlib.sha256(example_id.encode()).hexdigest()[:8]}.{'jpg' if kind == 'jpeg' else kind}"


def llava_entries(row: dict[str, Any], image: str, *, pairs: str) -> Iterator[dict[str, Any]]:
    """LLaVA-style preference entries (one per pair): the human turn with ``<image>``, chosen and rejected."""
    responses = row["responses"]
    for i, j in preference_pairs(row["num_levels"], pairs=pairs):
        yield {
            "id": f"{row['id']}#{i}-{j}",
            "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{row['question']}"}],
            "chosen": responses[i],
            "rejected": responses[j],
            "chosen_level": i,
            "rejected_level": j,
        }


def _rows(cfg: ExportJobConfig) -> Iterator[dict[str, Any]]:
    for n, row in enumerate(iter_rows(cfg.input, columns=COLUMNS)):
        if cfg.max_rows is not None and n >= cfg.max_rows:
            return
        yield row


def _prepare(cfg: ExportJobConfig) -> Path:
    if not shard_files(cfg.input):
        raise FileNotFoundError(f"input: no preference shards (part-*.parquet) in {cfg.input}")
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(f"output {out} is not empty; choose another folder or set overwrite=true")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_trl(cfg: ExportJobConfig, out: Path) -> dict[str, int]:
    examples = 0
    with ShardWriter(out, TRL_SCHEMA, rows_per_shard=cfg.rows_per_shard) as writer:
        for row in _rows(cfg):
            writer.write_many(trl_rows(row, pairs=cfg.pairs))
            examples += 1
    return {"examples": examples, "pairs": writer.rows_written, "files": writer.next_index}


def export_llava(cfg: ExportJobConfig, out: Path) -> dict[str, int]:
    """Stream a JSON list (constant memory) and write each example's image once."""
    (out / "images").mkdir()
    examples = pairs = 0
    with (out / "llava.json").open("w") as fh:
        fh.write("[")
        for row in _rows(cfg):
            name = image_name(row["id"], row["image"])
            (out / "images" / name).write_bytes(row["image"])
            for entry in llava_entries(row, f"images/{name}", pairs=cfg.pairs):
                fh.write(("\n" if pairs == 0 else ",\n") + json.dumps(entry, ensure_ascii=False))
                pairs += 1
            examples += 1
        fh.write("\n]\n")
    return {"examples": examples, "pairs": pairs, "files": examples + 1}


def run(cfg: ExportJobConfig) -> dict[str, Any]:
    out = _prepare(cfg)
    counts = export_trl(cfg, out) if cfg.format == "trl" else export_llava(cfg, out)
    summary = {"format": cfg.format, "pairs_kind": cfg.pairs, "output": str(out), **counts}
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    print(f"[export] {counts['examples']} examples -> {counts['pairs']} {cfg.pairs} pairs ({cfg.format}): {out}")
    return summary
