"""The vLLM scorer against the exact transformers scorer on the same rows (``scorer.engine: vllm``).

Both views of y_w go through vLLM as prompt log-probs (the dropout view as image embeddings); the transformers
scorer in ``hscr.shift: logprob`` mode is the reference. Parity: coupled positions and replacement tokens
identical on at least 95% of the rows. The numbers (rows identical, largest log-prob difference, how often the
logit and log-prob shifts pick the same coupled positions) are printed for the report (``-s``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

_SPEC = importlib.util.find_spec("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_SPEC is None or _SPEC.origin is None, reason="needs vllm")]

TOP_K = 20
QUESTIONS = ["is there a nodule?", "is there a mass?", "what modality is this?", "describe the image."]
ANSWERS = [
    "yes", "no", "ct", "mri", "x-ray", "left", "ct of the chest showing a nodule on the left.",
    "mri of the brain with no abnormality.", "x-ray of the hand, no fracture.", "upper", "lower", "right",
]  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    """40 rows: scans with a bright square at different places and sizes, every question with several answers."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(40):
        pixels = (rng.random((64, 64)) * 120).astype("uint8")
        x, y, size = rng.integers(0, 40), rng.integers(0, 40), rng.integers(8, 24)
        pixels[y : y + size, x : x + size] = 230
        image = Image.fromarray(pixels).convert("RGB")
        out.append({"id": f"r{i}", "image": image, "question": QUESTIONS[i % 4], "answer": ANSWERS[i % 12]})
    return out


@pytest.fixture(scope="module")
def scorer_engine(confident_model_dir: Path):
    from hscr_platform.models.engines.vllm import VllmConfig, VllmEngine, vllm_engine_config

    base = VllmConfig(dtype="float32", max_model_len=192, block_size=32, kv_cache_memory_bytes=64 << 20)
    engine = VllmEngine(confident_model_dir, vllm_engine_config(base, top_k=TOP_K))
    yield engine
    engine.close()


def _hf_scores(model, processor, rows, cfg, excluded, eos):
    from hscr_platform.generation.scoring import response_token_ids, score_batch

    responses = [response_token_ids(processor, r["question"], r["answer"], eos_ids=eos) for r in rows]
    out = score_batch(
        model, processor, [r["image"] for r in rows], [r["question"] for r in rows], responses,
        ids_of=[r["id"] for r in rows], cfg=cfg, excluded=excluded,
    )  # fmt: skip
    return responses, [scored for scored, _ in out]


def test_vllm_scorer_matches_the_transformers_scorer(confident_model_dir, scorer_engine, rows):
    import torch

    from hscr_platform.generation.scoring import HscrConfig, excluded_token_ids, two_view_logits
    from hscr_platform.generation.vllm_scoring import VisionEncoder, VllmScorer
    from hscr_platform.models.loading import ModelConfig, load_vlm

    model, processor = load_vlm(ModelConfig(path=str(confident_model_dir)))
    excluded = excluded_token_ids(processor.tokenizer)
    cfg = replace(HscrConfig(), shift="logprob")
    responses, want = _hf_scores(model, processor, rows, cfg, excluded, scorer_engine.eos_ids)
    scorer = VllmScorer(scorer_engine, VisionEncoder(model=model, processor=processor), cfg=cfg, top_k=TOP_K,
                        excluded=excluded)  # fmt: skip
    args = ([r["image"] for r in rows], [r["question"] for r in rows], responses)
    got = scorer.score(*args, ids_of=[r["id"] for r in rows])
    same = [g.coupled == w.coupled and g.replacements == w.replacements for g, w in zip(got, want, strict=True)]
    assert sum(len(w.replacements) for w in want) >= len(rows), "the rows must have replacements to compare"

    # the largest log-prob difference, over every token vLLM returned, both views
    views = scorer.two_views(*args, ids_of=[r["id"] for r in rows])
    full, dropped = two_view_logits(model, processor, *args, ids_of=[r["id"] for r in rows], cfg=cfg)
    worst = 0.0
    for i, (vf, vd) in enumerate(views):
        for sparse, logits in ((vf, full[i]), (vd, dropped[i])):
            ref = torch.log_softmax(logits[: len(responses[i])], dim=-1)  # (T, V)
            for t, row in enumerate(sparse.rows):
                worst = max(worst, *(abs(lp - float(ref[t, tok])) for tok, lp in row.items()))
    _, logit_mode = _hf_scores(model, processor, rows, replace(cfg, shift="logit"), excluded, scorer_engine.eos_ids)
    agree = sum(a.coupled == b.coupled for a, b in zip(logit_mode, want, strict=True))
    stats = scorer.stats
    print(
        f"\n[vllm-scorer parity] rows identical (coupled positions + replacements): {sum(same)}/{len(rows)}; "
        f"largest log-prob difference {worst:.3e}; positions {stats.positions}, truncated plausible sets "
        f"{stats.truncated_plausible}, bounded replacements {stats.bounded_replacements}/{stats.replacements}; "
        f"logit vs log-prob shift: same coupled positions on {agree}/{len(rows)} rows"
    )
    assert sum(same) >= 0.95 * len(rows), f"only {sum(same)}/{len(rows)} rows identical"
    assert worst < 1e-3


def test_vllm_scorer_refuses_the_logit_shift(scorer_engine):
    from hscr_platform.generation.scoring import ExcludedTokens, HscrConfig
    from hscr_platform.generation.vllm_scoring import LOGIT_SHIFT_REFUSED, VllmScorer

    with pytest.raises(ValueError, match=r"hscr\.shift=logprob") as info:
        VllmScorer(scorer_engine, None, cfg=replace(HscrConfig(), shift="logit"), top_k=TOP_K,
                   excluded=ExcludedTokens(frozenset(), frozenset()))  # fmt: skip
    assert str(info.value) == LOGIT_SHIFT_REFUSED
