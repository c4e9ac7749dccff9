"""Toy preference shards for tests, manual runs and benchmarks: random scans, toy questions and ranked answers
in ``PREFERENCE_SCHEMA``, with or without stored reference log-probs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hscr_platform.models.logprobs import encode_prefixes

# --- toy shards (tests, manual runs, benchmarks) -----------------------------------------------------

TOY_QUESTIONS = ("is there a nodule?", "is there a mass?", "what modality is this?", "where is the mass?",
              "describe the image.")  # fmt: skip
TOY_ANSWERS = ("yes", "no", "ct", "mri", "x-ray", "left", "right", "upper", "lower",
            "ct of the chest showing a nodule on the left.",
            "mri of the brain with no abnormality.")  # fmt: skip


def _noise_png(rng: np.random.Generator, side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rng.random((side, side)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def toy_rows(tokenizer: Any, n_rows: int, *, seed: int = 0, levels: int = 4) -> list[dict]:
    """Rows of PREFERENCE_SCHEMA without reference log-probs: noise images, templated questions, the preferred
    answer and ``levels - 1`` other answers as the dispreferred ones (for tests, manual runs, benchmarks)."""
    rng, rows = np.random.default_rng(seed), []
    for i in range(n_rows):
        texts = [str(a) for a in rng.choice(TOY_ANSWERS, size=levels, replace=False)]
        ids = [tokenizer(" " + t + tokenizer.eos_token)["input_ids"] for t in texts]
        rows.append(
            {
                "id": f"toy-{seed}-{i}",
                "source": "toy",
                "image": _noise_png(rng),
                "question": str(rng.choice(TOY_QUESTIONS)),
                "responses": texts,
                "response_token_ids": ids,
                "num_levels": levels - 1,
            }
        )
    return rows


def toy_preference_rows(model_dir: str | Path, n_rows: int, *, seed: int = 0, levels: int = 4) -> list[dict]:
    """:func:`toy_rows` with the reference log-probs and fingerprint of the model in ``model_dir``."""
    from hscr_platform.models.loading import ModelConfig, load_vlm
    from hscr_platform.models.logprobs import model_fingerprint, shared_prefix_logps

    model, processor = load_vlm(ModelConfig(path=str(model_dir)))
    rows, fingerprint = (
        toy_rows(processor.tokenizer, n_rows, seed=seed, levels=levels),
        model_fingerprint(model_dir),
    )
    for start in range(0, n_rows, 8):
        chunk = rows[start : start + 8]
        images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in chunk]
        prefix = encode_prefixes(processor, images, [r["question"] for r in chunk])
        responses = [ids for r in chunk for ids in r["response_token_ids"]]
        owner = [b for b, r in enumerate(chunk) for _ in r["response_token_ids"]]
        with torch.no_grad():
            logps = shared_prefix_logps(model, prefix, responses, owner, pad_id=processor.tokenizer.pad_token_id)[0]
        for b, r in enumerate(chunk):
            r["ref_logps"], r["ref_fingerprint"] = (
                logps[torch.tensor(owner) == b].tolist(),
                fingerprint,
            )  # (1 + k,)
    return rows


def write_preference_shards(rows: Sequence[dict], folder: str | Path, *, rows_per_shard: int = 64) -> Path:
    from hscr_platform.core.io import ShardWriter
    from hscr_platform.data.schema import PREFERENCE_ROW_GROUP, PREFERENCE_SCHEMA

    with ShardWriter(folder, PREFERENCE_SCHEMA, rows_per_shard=rows_per_shard,
                     row_group_size=PREFERENCE_ROW_GROUP) as writer:  # fmt: skip
        writer.write_many({name: row.get(name) for name in PREFERENCE_SCHEMA.names} for row in rows)
    return Path(folder)
