"""Preference rows for training: streaming, validating and collating them into shared-prefix batches.

A preference shard row (``PREFERENCE_SCHEMA``) holds one image + question and its ranked responses
``y_w ≻ y_l1 ≻ ... ≻ y_lk``. Training reads the shards as a deterministic stream:

    epoch order   files in a seeded order, each cut into windows of ``shuffle_window`` rows, rows shuffled
                  inside a window (memory is bounded by one window, never by the dataset)
    positions     row ``p`` of an epoch belongs to micro-round ``p // micro`` and to worker
                  ``(p // micro) % world``; step ``s`` covers positions ``[s·G, (s+1)·G)`` (G = global batch)

so a resumed run restarts at exactly ``step · G`` without replaying anything, and the global batch of a step
does not depend on how it is split over workers and accumulation. A bad row (too few responses, list lengths
that disagree, a missing or undecodable image) is dropped from its micro-batch with a counted reason; a stale
reference fingerprint only marks the row for a reference forward.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hscr_platform.models.logprobs import encode_prefixes

# Only what training needs (per-token log-probs and replacement details stay on disk).
COLUMNS = ["id", "image", "question", "responses", "response_token_ids", "num_levels", "ref_logps",
           "ref_fingerprint"]  # fmt: skip
SKIP_REASONS = (
    "missing_image", "bad_image", "empty_question", "too_few_responses", "length_mismatch", "empty_response",
    "bad_token_ids",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PrefDataConfig:
    path: str  # folder of preference shards (part-*.parquet, PREFERENCE_SCHEMA)
    max_rows: int | None = None  # use only the first rows of the dataset (None = all)
    max_levels: int = 4  # responses used per example (1 + k); extra, worst-ranked ones are dropped
    shuffle: bool = True
    shuffle_window: int = 256  # rows shuffled together (and held in memory) at a time
    log_skipped: int = 10  # skipped rows printed by id per worker (all of them are counted)

    def __post_init__(self) -> None:
        if self.max_levels < 2:
            raise ValueError(f"max_levels must be >= 2 (preferred + a dispreferred), got {self.max_levels}")
        if self.shuffle_window < 1 or (self.max_rows is not None and self.max_rows < 1):
            raise ValueError("shuffle_window and max_rows must be >= 1")


# --- validation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One valid preference row, ready to collate. ``ref_logps`` is None when the reference must run."""

    id: str
    image: Image.Image
    question: str
    responses: tuple[tuple[int, ...], ...]  # 1 + k token-id lists, level 0 preferred
    ref_logps: tuple[float, ...] | None
    ref_status: str  # stored | stale (fingerprint differs) | missing | off (stored values not used)


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str  # one of SKIP_REASONS
    detail: str = ""


def _check_lists(row: dict[str, Any], vocab_size: int) -> Skip | None:
    texts, ids, rid = row.get("responses") or [], row.get("response_token_ids") or [], str(row.get("id"))
    if len(texts) < 2 or len(ids) < 2:
        return Skip(rid, "too_few_responses", f"{len(texts)} responses, {len(ids)} token lists")
    if len(texts) != len(ids) or (row.get("num_levels") is not None and row["num_levels"] + 1 != len(ids)):
        detail = f"responses={len(texts)} token lists={len(ids)} k={row.get('num_levels')}"
        return Skip(rid, "length_mismatch", detail)
    if any(not r for r in ids):
        return Skip(rid, "empty_response", "a response has no tokens")
    if any(t < 0 or t >= vocab_size for r in ids for t in r):
        return Skip(rid, "bad_token_ids", f"a token id is outside the vocabulary of {vocab_size}")
    return None


def _decode_image(row: dict[str, Any]) -> Image.Image | Skip:
    data = row.get("image")
    if not data:
        return Skip(str(row.get("id")), "missing_image")
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return Skip(str(row.get("id")), "bad_image", f"{type(exc).__name__}: {exc}")


def _reference(row: dict[str, Any], n: int, *, fingerprint: str, use_stored: bool) -> tuple[Any, str]:
    if not use_stored:
        return None, "off"
    if row.get("ref_fingerprint") != fingerprint:
        return None, "stale"
    stored = row.get("ref_logps")
    if stored is None or len(stored) != len(row["response_token_ids"]):
        return None, "missing"
    return tuple(float(v) for v in stored[:n]), "stored"


def to_example(
    row: dict[str, Any], *, max_levels: int, vocab_size: int, fingerprint: str, use_stored: bool
) -> Example | Skip:
    """Validate a raw row; keep the ``max_levels`` best responses; decide where its reference comes from."""
    bad = _check_lists(row, vocab_size)
    if bad is not None:
        return bad
    if not (row.get("question") or "").strip():
        return Skip(str(row.get("id")), "empty_question")
    image = _decode_image(row)
    if isinstance(image, Skip):
        return image
    n = min(max_levels, len(row["response_token_ids"]))
    ref, status = _reference(row, n, fingerprint=fingerprint, use_stored=use_stored)
    responses = tuple(tuple(int(t) for t in r) for r in row["response_token_ids"][:n])
    return Example(str(row["id"]), image, row["question"], responses, ref, status)


class SkipLog:
    """Counts skipped rows by reason and prints the first few by id (per worker)."""

    def __init__(self, *, prefix: str, limit: int):
        self.prefix, self.limit = prefix, limit
        self.counts: Counter[str] = Counter()

    def note(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        if self.counts.total() <= self.limit:
            print(f"{self.prefix} skipped row {skip.id}: {skip.reason} {skip.detail}".rstrip(), flush=True)


# --- collation ----------------------------------------------------------------------------------------


@dataclass
class PrefBatch:
    """B examples with R = Σ responses, as :func:`shared_prefix_logps` and the multi-level loss take them."""

    ids: list[str]
    prefix: dict[str, torch.Tensor]  # left-padded prompts + pixel values
    responses: list[tuple[int, ...]]  # R token-id lists
    owner: torch.Tensor  # (R,) example of each response
    level: torch.Tensor  # (R,) level of each response (0 = preferred)
    level_mask: torch.Tensor  # (B, L) bool: the level exists (all False for a filler)
    ref_logps: torch.Tensor  # (B, L) stored reference log-probs, NaN where unknown
    needs_ref: torch.Tensor  # (B,) bool: run the reference on this example
    ref_status: list[str]

    @property
    def num_valid(self) -> int:
        return int(self.level_mask[:, 0].sum())


def filler_example(eos_id: int) -> Example:
    """A stand-in for a micro-batch whose rows were all skipped: it keeps every worker stepping together
    (collectives need the same number of forwards everywhere) and is masked out of loss and metrics."""
    return Example("<filler>", Image.new("RGB", (32, 32)), "?", ((eos_id,), (eos_id,)), (0.0, 0.0), "filler")


def collate(examples: Sequence[Example], processor: Any, *, num_levels: int) -> PrefBatch:
    """Stack examples into a shared-prefix batch; an empty list becomes one masked filler example."""
    filler = not examples
    if filler:
        examples = [filler_example(processor.tokenizer.eos_token_id)]
    prefix = encode_prefixes(processor, [e.image for e in examples], [e.question for e in examples])
    sizes = [len(e.responses) for e in examples]
    level_mask = torch.arange(num_levels)[None, :] < torch.tensor(sizes)[:, None]  # (B, L)
    ref = torch.full((len(examples), num_levels), float("nan"))  # (B, L)
    for b, e in enumerate(examples):
        if e.ref_logps is not None:
            ref[b, : len(e.ref_logps)] = torch.tensor(e.ref_logps)
    return PrefBatch(
        ids=[e.id for e in examples],
        prefix=prefix,
        responses=[r for e in examples for r in e.responses],
        owner=torch.tensor([b for b, n in enumerate(sizes) for _ in range(n)]),  # (R,)
        level=torch.tensor([j for n in sizes for j in range(n)]),  # (R,)
        level_mask=level_mask & torch.tensor(not filler),
        ref_logps=ref,
        needs_ref=torch.tensor([e.ref_logps is None for e in examples]),  # (B,)
        ref_status=[e.ref_status for e in examples],
    )


def as_matrix(flat: torch.Tensor, batch: PrefBatch, *, num_levels: int) -> torch.Tensor:
    """(R,) per-response values -> (B, L) by (owner, level); missing levels are 0 (masked by level_mask)."""
    out = flat.new_zeros(batch.level_mask.shape[0], num_levels)  # (B, L)
    return out.index_put((batch.owner.to(flat.device), batch.level.to(flat.device)), flat)  # (B, L)


# --- raw rows -> a training micro-batch ---------------------------------------------------------------

REF_RECOMPUTE = ("stale", "missing", "off")  # why a row's reference log-probs are computed, not read


@dataclass
class Prepared:
    """A collated micro-batch and what happened to its raw rows."""

    batch: PrefBatch
    skipped: Counter[str]  # rows dropped, by SKIP_REASONS
    recomputed: Counter[str]  # rows whose reference runs, by REF_RECOMPUTE


def prepare(rows: Sequence[dict], processor: Any, cfg: PrefDataConfig, *, fingerprint: str, use_stored: bool,
            log: SkipLog) -> Prepared:  # fmt: skip
    """Validate a micro-batch of raw rows (bad ones dropped and logged) and collate the rest."""
    examples, skipped = [], Counter[str]()
    for row in rows:
        ex = to_example(row, max_levels=cfg.max_levels, vocab_size=len(processor.tokenizer),
                        fingerprint=fingerprint, use_stored=use_stored)  # fmt: skip
        if isinstance(ex, Skip):
            log.note(ex)
            skipped[ex.reason] += 1
        else:
            examples.append(ex)
    recomputed = Counter(e.ref_status for e in examples if e.ref_logps is None)
    return Prepared(collate(examples, processor, num_levels=cfg.max_levels), skipped, recomputed)
