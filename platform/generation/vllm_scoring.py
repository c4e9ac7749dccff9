"""Two-view scoring of y_w inside a vLLM engine (``scorer.engine: vllm``): METHOD.md steps 1-5 from log-probs.

y_w is teacher-forced twice as a vLLM prompt with ``prompt_logprobs=top_k``: under the full view (the image, so
its KV blocks land in the prefix cache that every level's continuation then reads) and under the dropout view,
given as image embeddings (the model's projected visual tokens with the dropped ones zeroed, exactly what the
transformers scorer injects; the engine needs ``enable_mm_embeds``). vLLM returns, per response position, the
log-probs of the top-K tokens and of the emitted token: no logits, no full-vocabulary dicts.

What that gives, against the exact transformers scorer (``scoring.py``):
- the shift is the log-prob shift ``Δ_t = log p_t[y_t] − log p'_t[y_t]`` (``hscr.shift: logprob``): exact. The
  logit shift needs the two views' normalisers, which vLLM does not return, so ``logit`` is refused.
- ``P_diff`` and the replacement are unchanged by per-position constants, so log-probs give the logits' answer
  wherever the tokens involved are known: the plausible set (full-view tokens within ``log α`` of the best) is
  exact when it fits in the top-K; a plausible token missing from the dropped view's top-K gets the K-th
  dropped log-prob, an upper bound. A replacement that is a token with a known dropped log-prob is exact (an
  unknown token's true score can only be higher than its bound); ``VllmScoreStats`` counts the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hscr.replace import replacement_plan
from hscr.rewards import (
    contrastive_logits,
    coupled_positions,
    eligible_token_mask,
    replacement_candidates,
    token_reward,
    token_shift,
)
from hscr_platform.generation.scoring import ExcludedTokens, HscrConfig, Scored, dropped_view

LOGIT_SHIFT_REFUSED = (
    "scorer.engine 'vllm' scores log-probs (vLLM returns no logits, so the two views' normalisers are unknown): "
    "set hscr.shift=logprob, or scorer.engine=transformers for the logit shift"
)


@dataclass
class VllmScoreStats:
    """How much of the scoring was exact (the report's numbers; see the module docstring)."""

    rows: int = 0
    positions: int = 0  # response positions scored
    truncated_plausible: int = 0  # positions whose plausible set may extend beyond the full view's top-K
    bounded_replacements: int = 0  # replacements picked with the dropped log-prob only bounded (not certain)
    replacements: int = 0


@dataclass(frozen=True)
class SparseView:
    """One view's log-probs of one response, as vLLM returns them: per position {token id: log-prob}."""

    rows: list[dict[int, float]]  # (T,) top-K tokens + the emitted token

    def dense(self, vocab: int, *, top_k: int, bound_missing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, V) log-probs and (T, V) known mask. Unknown tokens get −inf, or with ``bound_missing`` the row's
        K-th best log-prob (an upper bound on every token outside the top-K)."""
        values = torch.full((len(self.rows), vocab), -math.inf)  # (T, V)
        known = torch.zeros((len(self.rows), vocab), dtype=torch.bool)  # (T, V)
        for t, row in enumerate(self.rows):
            ids = torch.as_tensor(list(row), dtype=torch.long)  # (K',) top-K + the emitted token
            lps = torch.as_tensor(list(row.values()), dtype=torch.float32)  # (K',)
            if bound_missing:
                values[t] = sorted(row.values(), reverse=True)[: max(top_k, 1)][-1]
            values[t, ids] = lps
            known[t, ids] = True
        return values, known


def sparse_view(prompt_logprobs: Sequence[Mapping[int, Any] | None], length: int) -> SparseView:
    """The last ``length`` positions of a vLLM ``prompt_logprobs`` list (the response's), as plain floats."""
    rows = list(prompt_logprobs)[-length:]
    if len(rows) != length or any(row is None for row in rows):
        raise ValueError(f"vLLM returned {len(rows)} prompt log-prob rows for a {length}-token response")
    return SparseView([{int(k): float(v.logprob) for k, v in row.items()} for row in rows if row is not None])


def _truncated(full: SparseView, *, top_k: int, alpha: float) -> int:
    """Positions where the K-th best full-view token is still plausible (more may be, beyond the top-K)."""
    log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    count = 0
    for row in full.rows:
        top = sorted(row.values(), reverse=True)[:top_k]  # an emitted token outside the top-K ranks below it
        count += len(top) == top_k and top[-1] - top[0] >= log_alpha
    return count


def score_from_logprobs(
    full: SparseView,
    dropped: SparseView,
    response: Sequence[int],
    *,
    vocab: int,
    cfg: HscrConfig,
    excluded: ExcludedTokens,
    top_k: int,
    stats: VllmScoreStats | None = None,
) -> Scored:
    """Shift (log-prob), reward, coupled positions, replacements and the level plan of one example.

    full, dropped: the response's T rows of each view. Tokens outside the full view's rows are implausible
    (log-prob −inf); outside the dropped view's rows they get the row's bound (see the module docstring).
    """
    ids = torch.as_tensor(list(response), dtype=torch.long)  # (T,)
    full_lp, _ = full.dense(vocab, top_k=top_k, bound_missing=False)  # (T, V)
    dropped_lp, dropped_known = dropped.dense(vocab, top_k=top_k, bound_missing=True)  # (T, V)
    full_bound = full.dense(vocab, top_k=top_k, bound_missing=True)[0] if cfg.plausible_view != "full" else None
    shift = token_shift(full_lp, dropped_lp, ids)  # (T,) a difference of log-probs: the log-prob shift
    reward = token_reward(full_lp, dropped_lp, ids, beta=cfg.beta, alpha=cfg.alpha)  # (T,)
    eligible = _eligible(ids, response, cfg=cfg, excluded=excluded)  # (T,)
    coupled = coupled_positions(shift, n=cfg.n_coupled, eligible=eligible).tolist()
    special = torch.as_tensor(sorted(excluded.special), dtype=torch.long)  # (S,)
    replacements: dict[int, int] = {}
    for p in coupled:
        token = _replacement(
            full_lp[p],
            dropped_lp[p],
            int(ids[p]),
            cfg=cfg,
            never=special,
            dropped_known=dropped_known[p],
            full_bound=None if full_bound is None else full_bound[p],
        )
        if token is not None:
            replacements[p] = token
            if stats is not None:
                stats.replacements += 1
                stats.bounded_replacements += not bool(dropped_known[p, token])
    if stats is not None:
        stats.rows += 1
        stats.positions += len(response)
        stats.truncated_plausible += _truncated(full, top_k=top_k, alpha=cfg.alpha)
    ordered = [p for p in coupled if p in replacements]  # most coupled first
    levels = replacement_plan(ordered, levels=cfg.levels) if ordered else []
    return Scored(shift.tolist(), reward.tolist(), coupled, replacements, levels)


def _eligible(ids: torch.Tensor, response: Sequence[int], *, cfg: HscrConfig, excluded: ExcludedTokens) -> torch.Tensor:
    """(T,) positions that may be coupled: as ``score_example`` decides (special, punctuation, function words)."""
    eligible = eligible_token_mask(ids, special_ids=excluded.special, punctuation_ids=excluded.punctuation)  # (T,)
    if getattr(cfg, "exclude_function_words", False):
        from hscr.rewards import function_word_mask

        eligible &= ~function_word_mask([excluded.pieces[t] for t in response])  # (T,)
    return eligible


def _replacement(
    full_t: torch.Tensor,
    dropped_t: torch.Tensor,
    token: int,
    *,
    cfg: HscrConfig,
    never: torch.Tensor,
    dropped_known: torch.Tensor | None = None,
    full_bound: torch.Tensor | None = None,
) -> int | None:
    """The lowest-P_diff plausible token at one position (``hscr.rewards.hallucinated_replacement``'s rule):
    plausibility on ``hscr.plausible_view`` with every token counted, then the emitted and special tokens removed.
    full_t, dropped_t: (V,) log-probs (−inf / the bound where vLLM returned none). With the dropped view in the
    rule, only tokens vLLM returned for it (``dropped_known``) can be plausible there, and a candidate missing
    from the full view's top-K is scored with the full view's bound (``full_bound``) instead of −inf."""
    view = cfg.plausible_view
    # an unreturned dropped-view token is never plausible there (the max over the returned ones is unchanged)
    dropped_seen = dropped_t if dropped_known is None else dropped_t.masked_fill(~dropped_known, -math.inf)  # (V,)
    candidates = replacement_candidates(full_t, dropped_seen, alpha=cfg.alpha, view=view)  # (V,)
    scores = contrastive_logits(
        full_t if full_bound is None or view == "full" else full_bound, dropped_t, beta=cfg.beta
    )
    candidates[never] = False
    candidates[token] = False
    if not bool(candidates.any()):
        return None
    return int(torch.argmin(scores.masked_fill(~candidates, math.inf)))  # the first minimum: lower id on ties


class VisionEncoder:
    """The VLM's vision tower + projector: the projected visual tokens the dropout view zeroes.

    ``model``: a loaded HF VLM (the actor's, when it holds one); else the folder's model is loaded and its
    language model and head are dropped (the vLLM engine holds those)."""

    def __init__(self, model_cfg: Any = None, *, model: Any = None, processor: Any = None):
        if model is None:
            from hscr_platform.models.loading import load_vlm

            model, processor = load_vlm(model_cfg)
            model.model.language_model = None  # the vLLM engine runs the language model
            model.lm_head = None
            if torch.cuda.is_available():
                model = model.to("cuda")
        self.model, self.processor = model, processor
        self.vocab = int(getattr(model.config, "text_config", model.config).vocab_size)

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[torch.Tensor]:
        """One (N, D) of projected visual tokens per image, from the pixels the transformers scorer uses."""
        from hscr_platform.models.logprobs import encode_prefixes, image_feature_list

        return image_feature_list(self.model, encode_prefixes(self.processor, images, questions))


class VllmScorer:
    """Two-view scoring through a shared :class:`~hscr_platform.models.engines.vllm.VllmEngine`."""

    def __init__(self, engine: Any, encoder: VisionEncoder, *, cfg: HscrConfig, top_k: int, excluded: ExcludedTokens):
        if getattr(cfg, "shift", "logprob") != "logprob":
            raise ValueError(LOGIT_SHIFT_REFUSED)
        self.engine, self.encoder, self.cfg, self.top_k, self.excluded = engine, encoder, cfg, top_k, excluded
        self.stats = VllmScoreStats()

    def two_views(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        responses: Sequence[Sequence[int]],
        *,
        ids_of: Sequence[str],
    ) -> list[tuple[SparseView, SparseView]]:
        """(full, dropped) sparse log-probs of each y_w: 2B prompts in one ``generate`` call."""
        features = self.encoder.features(images, questions)  # B x (N, D)
        dropped = [view.cpu()[None] for view in dropped_view(features, ids_of, cfg=self.cfg)]  # B x (1, N, D)
        params = self.engine.vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k, detokenize=False
        )
        prompts = []
        for i, (question, response) in enumerate(zip(questions, responses, strict=True)):
            ids = self.engine.prompt_ids(question) + list(response)
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images[i]}})
            prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": dropped[i]}})
        outputs = self.engine.generate(prompts, [params] * len(prompts))
        views = [sparse_view(out.prompt_logprobs, len(responses[j // 2])) for j, out in enumerate(outputs)]
        return list(zip(views[0::2], views[1::2], strict=True))

    def score(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        responses: Sequence[Sequence[int]],
        *,
        ids_of: Sequence[str],
    ) -> list[Scored]:
        """``score_example``'s result for each example, from the two views' log-probs."""
        views = self.two_views(images, questions, responses, ids_of=ids_of)
        kwargs = {"vocab": self.encoder.vocab, "cfg": self.cfg, "excluded": self.excluded, "top_k": self.top_k}
        return [
            score_from_logprobs(full, dropped, response, stats=self.stats, **kwargs)
            for (full, dropped), response in zip(views, responses, strict=True)
        ]
