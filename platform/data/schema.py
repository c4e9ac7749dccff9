"""The common sample schema: what every reader writes and every stage reads (documented in docs/DATA.md).

One row = one image + one question + one reference answer. Images travel as encoded bytes (PNG/JPEG) so that
shards are self-contained and move between Ray nodes without a shared file system.
"""

from __future__ import annotations

from typing import Any, Final

import pyarrow as pa

ANSWER_TYPES: Final = ("closed", "open", "report")

FINDING_TYPE: Final = pa.struct(
    [
        ("kind", pa.string()),  # nodule | mass | effusion | cyst ...
        ("position", pa.string()),  # left | right | upper | lower
        ("size", pa.float32()),  # radius as a fraction of the image side
        ("x", pa.float32()),  # centre, fraction of the width (0 = left edge of the image)
        ("y", pa.float32()),  # centre, fraction of the height (0 = top)
    ]
)

SAMPLE_SCHEMA: Final = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # unique within a dataset
        pa.field("source", pa.string(), nullable=False),  # synthmed | vqa_rad | slake | pathvqa | ...
        pa.field("split", pa.string(), nullable=False),  # train | validation | test
        pa.field("image", pa.binary(), nullable=False),  # encoded image bytes (PNG / JPEG)
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("answer_type", pa.string(), nullable=False),  # one of ANSWER_TYPES
        pa.field("question_type", pa.string()),  # presence | location | modality | count | kind | report | ...
        pa.field("modality", pa.string()),  # ct | mri | xray | ... (null when unknown)
        pa.field("organ", pa.string()),  # chest | brain | abdomen | ... (null when unknown)
        pa.field("findings", pa.list_(FINDING_TYPE)),  # exact ground truth (SynthMed); null elsewhere
        pa.field("meta", pa.string()),  # JSON object with source-specific fields, kept verbatim
    ]
)

REJECT_SCHEMA: Final = pa.schema(
    [
        pa.field("id", pa.string()),  # the row's id, or a positional id (e.g. "row:17") when it had none
        pa.field("source", pa.string()),  # the dataset / file the row came from
        pa.field("reason", pa.string()),  # a short stable code: missing_image, empty_question, duplicate_id, ...
        pa.field("detail", pa.string()),  # a human-readable explanation
    ]
)


def sample_row(**values: Any) -> dict[str, Any]:
    """A dict with every SAMPLE_SCHEMA column (missing optional ones set to None); unknown keys fail."""
    unknown = set(values) - set(SAMPLE_SCHEMA.names)
    if unknown:
        raise KeyError(f"not sample columns: {sorted(unknown)}")
    return {name: values.get(name) for name in SAMPLE_SCHEMA.names}


def reject_row(*, id: str, source: str, reason: str, detail: str = "") -> dict[str, str]:
    """A row of the rejects table."""
    return {"id": id, "source": source, "reason": reason, "detail": detail}


# One row = one example's ranked list y_w ≻ y_l1 ≻ ... ≻ y_lk (written by generation, read by training).
# List columns indexed by response are aligned: index 0 = preferred (y_w), then dispreferred best -> worst.
# Rows per parquet row group in preference shards (training's default shuffle window): a training worker whose
# share starts or ends inside a file reads only the row groups that hold its windows (training/pref_stream.py),
# not the whole file. Measured on the scale run's 10k-row output: bytes read per worker 0.77 -> 0.63 of the
# shards, for 3% larger files (groups of 64 rows: 0.75, for 23% larger files).
PREFERENCE_ROW_GROUP: Final = 256

PREFERENCE_SCHEMA: Final = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the sample's id
        pa.field("source", pa.string()),
        pa.field("image", pa.binary(), nullable=False),  # encoded image bytes, as in the sample
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer_type", pa.string()),
        pa.field("question_type", pa.string()),
        pa.field("responses", pa.list_(pa.string()), nullable=False),  # 1 + k texts
        pa.field("response_token_ids", pa.list_(pa.list_(pa.int32())), nullable=False),  # response tokens + eos
        pa.field("num_levels", pa.int32(), nullable=False),  # k: dispreferred levels kept (1..k_max)
        pa.field("similarity", pa.list_(pa.float32())),  # k: similarity of each dispreferred response to y_w
        pa.field("replaced_positions", pa.list_(pa.list_(pa.int32()))),  # k lists: positions in y_w replaced
        pa.field("original_token_ids", pa.list_(pa.list_(pa.int32()))),  # k lists: y_w's tokens there
        pa.field("replacement_token_ids", pa.list_(pa.list_(pa.int32()))),  # k lists: the hallucinated tokens
        pa.field("coupled_positions", pa.list_(pa.int32())),  # top-n modality-coupled positions of y_w
        pa.field("token_shift", pa.list_(pa.float32())),  # per token of y_w: z_t[y_t] - z'_t[y_t]
        pa.field("token_reward", pa.list_(pa.float32())),  # per token of y_w: P_diff of the emitted token
        pa.field("ref_logps", pa.list_(pa.float32())),  # 1 + k: reference summed log-probs per response
        pa.field("ref_token_logps", pa.list_(pa.list_(pa.float32()))),  # 1 + k lists: per-token log-probs
        pa.field("ref_fingerprint", pa.string()),  # reference model + processor + chat template
        pa.field("config_hash", pa.string()),  # the generation config that produced the row
    ]
)
