"""Two-view scoring of the preferred response y_w and what HSCR derives from it (METHOD.md, steps 1-6).

For a batch of examples: teacher-force y_w under the full view and the visual-token-dropout view in ONE forward
(2B rows; the dropped view's visual tokens are injected as encoder outputs, zeroed where dropped), take the last
hidden states at every response position, then per example (its full-vocabulary logits made and freed in turn, on
the model's device) the token shift, the token reward, the top-n modality-coupled positions, a hallucinated
replacement for each, and the forced prefix of every level. The maths lives in ``hscr.rewards`` /
``hscr.replace``; this module wires it to a HF model.

    cfg = HscrConfig()
    ids = response_token_ids(processor, question, answer, eos_ids={2})
    [(scored, y_w_logps)] = score_batch(model, processor, [image], [question], [ids], ids_of=["ex-1"], cfg=cfg,
                                        excluded=excluded_token_ids(processor.tokenizer))
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from hscr.replace import edited_prefix, replacement_plan
from hscr.rewards import (
    coupled_positions,
    eligible_token_mask,
    example_generator,
    function_word_mask,
    hallucinated_replacement,
    punctuation_token_ids,
    token_reward,
    token_shift,
    visual_token_dropout,
)
from hscr_platform.models.loading import conversation_text, prompt_text
from hscr_platform.models.logprobs import (
    encode_prefixes,
    features_as_encoder_outputs,
    following_positions,
    image_feature_list,
    pad_responses,
    prefix_positions,
)


@dataclass(frozen=True, kw_only=True)
class HscrConfig:
    """The method's knobs (METHOD.md): defaults are the paper's values or the project's stated choices."""

    p_drop: float = 0.7  # fraction of visual tokens dropped in the second view
    dropout_mode: Literal["zero"] = "zero"  # zeroed embeddings (LLaVA needs the placeholder count intact)
    beta: float = 0.9  # contrast strength: P_diff = softmax((1+β) z − β z')
    alpha: float = 0.1  # plausibility: candidates need p ≥ α · max p under the full view
    n_coupled: int = 10  # top-n modality-coupled positions
    levels: int = 10  # candidates m = 1..levels (level m replaces the m most-coupled positions)
    k: int = 3  # dispreferred levels kept after re-ranking
    min_gap: float = 0.1  # adjacent kept similarities differ by at least this
    # drop candidates above this similarity to y_w: near-copies the similarity cannot grade (null = keep all);
    # exact copies up to case, punctuation and spacing are dropped before re-ranking whatever this is
    max_similarity: float | None = 0.999
    seed: int = 0  # seeds the per-example dropout masks
    # Δ_t on raw logits (the default) or on log-probs (a shift that moves a whole position's logits counts 0)
    shift: Literal["logit", "logprob"] = "logit"
    exclude_function_words: bool = False  # "the", "of", "a", "and", ... never modality-coupled (hscr.rewards)
    # where a replacement must be plausible (α): the full view (VCD's rule), the dropped view (what the model says
    # without looking) or either (hscr.rewards.replacement_candidates); the reward P_diff keeps the full view
    plausible_view: Literal["full", "dropped", "either"] = "full"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_drop <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError("p_drop and alpha must be in [0, 1]")
        if min(self.n_coupled, self.levels, self.k) < 1:
            raise ValueError("n_coupled, levels and k must be >= 1")
        if self.min_gap < 0:
            raise ValueError("min_gap must be >= 0")


@dataclass(frozen=True)
class ExcludedTokens:
    """Token ids never modality-coupled (special, punctuation-only) or never emitted as a replacement."""

    special: frozenset[int]
    punctuation: frozenset[int]
    pieces: tuple[str, ...] = ()  # token id -> its text, a leading space where it starts a word (function words)


@dataclass(frozen=True)
class Scored:
    """Stage-1 result for one example (positions index y_w's response tokens)."""

    shift: list[float]  # (T,) Δ_t = z_t[y_t] − z'_t[y_t]
    reward: list[float]  # (T,) P_diff_t[y_t]
    coupled: list[int]  # top-n eligible positions, most coupled first
    replacements: dict[int, int]  # coupled position -> hallucinated token (positions without one omitted)
    levels: list[tuple[int, ...]]  # level m-1 -> positions it replaces (sorted)


def excluded_token_ids(tokenizer: Any) -> ExcludedTokens:
    """Special ids (incl. the image placeholder), punctuation/whitespace-only ids and every id's word piece."""
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    special = set(tokenizer.all_special_ids)
    image_token = getattr(tokenizer, "image_token_id", None)
    if image_token is not None:
        special.add(int(image_token))
    return ExcludedTokens(frozenset(special), frozenset(punctuation_token_ids(texts)), token_pieces(tokenizer))


def token_pieces(tokenizer: Any) -> tuple[str, ...]:
    """Each id's vocabulary piece with the word-start marker as a space (SentencePiece "▁", byte-level "Ġ")."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(str(p or "").replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n") for p in pieces)


def response_token_ids(processor: Any, question: str, answer: str, *, eos_ids: Collection[int]) -> list[int]:
    """y_w as the chat template writes it after the prompt, ending with end-of-sequence.

    The conversation's tokens minus the prompt's (the prompt must be a token prefix of the conversation), cut
    after the first end-of-sequence token; an eos is appended if the template writes none.
    """
    tok = processor.tokenizer
    prompt = tok(prompt_text(processor, question), add_special_tokens=False)["input_ids"]
    full = tok(conversation_text(processor, question, answer), add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template: the prompt is not a token prefix of the conversation")
    response = list(full[len(prompt) :])
    ends = [i for i, t in enumerate(response) if t in eos_ids]
    return response[: ends[0] + 1] if ends else [*response, int(tok.eos_token_id)]


def model_token_limit(config: Any, override: int | None = None) -> int:
    """Longest sequence (image tokens + prompt + response) a model takes: ``override`` or its positions.

    config: the model's config (``model.config`` or ``AutoConfig``); VLMs keep the limit in ``text_config``.
    """
    if override is not None:
        return override
    text_config = getattr(config, "text_config", config)
    return int(text_config.max_position_embeddings)


def dropped_view(
    features: torch.Tensor | Sequence[torch.Tensor], example_ids: Sequence[str], *, cfg: HscrConfig
) -> torch.Tensor | list[torch.Tensor]:
    """Visual tokens with ``p_drop`` of each example's tokens zeroed, seeded per example id.

    features: (B, N, D), or one (N_i, D) per example where counts differ (Qwen2-VL family); the same form
    comes back.
    """
    views = [
        visual_token_dropout(
            features[i], p_drop=cfg.p_drop, generator=example_generator(cfg.seed, ex), mode=cfg.dropout_mode
        )[0]
        for i, ex in enumerate(example_ids)
    ]
    return torch.stack(views) if isinstance(features, torch.Tensor) else views  # (B, N, D) or [(N_i, D)]


def _two_view_inputs(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    ids_of: Sequence[str],
    cfg: HscrConfig,
) -> tuple[dict[str, Any], int]:
    """Model inputs of 2B rows (full view, then dropped view) and T, the longest response."""
    device = model.device
    prefix = encode_prefixes(processor, images, questions)
    features = image_feature_list(model, prefix)  # one (N_i, D) per image; N_i may differ (Qwen2-VL)
    views = [*features, *dropped_view(features, ids_of, cfg=cfg)]  # 2B images: full, then dropped
    ids, mask = pad_responses(responses, pad_id=int(processor.tokenizer.pad_token_id))  # (B, T)
    seq = torch.cat([prefix["input_ids"], ids], dim=1).to(device).repeat(2, 1)  # (2B, P + T)
    attn = torch.cat([prefix["attention_mask"], mask.long()], dim=1).to(device).repeat(2, 1)  # (2B, P + T)
    rows = prefix_positions(prefix)  # (B, P), or (3, B, P) for mRoPE
    positions = torch.cat([rows, following_positions(rows, ids.shape[1])], dim=-1).to(device)  # (..., B, P + T)
    positions = torch.cat([positions, positions], dim=-2)  # (..., 2B, P + T)
    inputs = {
        "input_ids": seq,
        "attention_mask": attn,
        "position_ids": positions,
        "mm_encoder_outputs": features_as_encoder_outputs(views),
    }
    return inputs, ids.shape[1]


@torch.no_grad()
def two_view_logits(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    ids_of: Sequence[str],
    cfg: HscrConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits of y_w under the full and the dropped view, one forward of 2B rows.

    Returns (full, dropped), each (B, T, V) float32 with T = the longest response; row i is valid for its
    first ``len(responses[i])`` positions (position t = the logits that predict response token t).
    Holds the whole batch's logits: :func:`score_batch` is what generation runs (logits per example).
    """
    inputs, width = _two_view_inputs(model, processor, images, questions, responses, ids_of=ids_of, cfg=cfg)
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :width].float()  # (2B, T, V)
    batch = len(responses)
    return logits[:batch], logits[batch:]  # (B, T, V) each


@torch.no_grad()
def two_view_hidden(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    ids_of: Sequence[str],
    cfg: HscrConfig,
) -> torch.Tensor:
    """The last hidden states that predict y_w's tokens, (2B, T, D): full view rows 0..B-1, then dropped.

    The same forward as :func:`two_view_logits` without the LM head (``model.model``; LLaVA-style and
    Qwen2-VL heads are a plain linear on these states), so no (2B, T, V) logits exist at once.
    """
    inputs, width = _two_view_inputs(model, processor, images, questions, responses, ids_of=ids_of, cfg=cfg)
    hidden = model.model(**inputs).last_hidden_state  # (2B, P + T, D)
    return hidden[:, -(width + 1) : -1]  # (2B, T, D): position P - 1 + t predicts response token t


@torch.no_grad()
def score_batch(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    responses: Sequence[Sequence[int]],
    *,
    ids_of: Sequence[str],
    cfg: HscrConfig,
    excluded: ExcludedTokens,
) -> list[tuple[Scored, list[float]]]:
    """:func:`score_example` for a batch, plus y_w's full-view per-token log-probs (the reference's).

    One forward of 2B rows to hidden states, then per example the LM head on its 2 × T rows, everything on
    the model's device, the example's logits freed before the next: the peak holds (2, T, V) float32 logits,
    not (2B, T, V). Returns (scored, token log-probs (T,)) per example, in batch order.
    """
    hidden = two_view_hidden(model, processor, images, questions, responses, ids_of=ids_of, cfg=cfg)
    head, batch, out = model.get_output_embeddings(), len(responses), []
    for i, response in enumerate(responses):
        logits = head(hidden[[i, batch + i], : len(response)]).float()  # (2, T, V)
        scored = score_example(logits[0], logits[1], response, cfg=cfg, excluded=excluded)
        ids = torch.as_tensor(list(response), dtype=torch.long, device=logits.device)  # (T,)
        logps = torch.log_softmax(logits[0], dim=-1).gather(-1, ids[:, None]).squeeze(-1)  # (T,)
        out.append((scored, logps.tolist()))
        del logits, logps
    return out


def score_example(
    full: torch.Tensor,
    dropped: torch.Tensor,
    response: Sequence[int],
    *,
    cfg: HscrConfig,
    excluded: ExcludedTokens,
) -> Scored:
    """Shift, reward, coupled positions, replacements and the level plan of one example.

    full, dropped: (≥T, V) logits rows of this example (padding rows beyond T are ignored), on any device.
    """
    length, device = len(response), full.device
    full, dropped = full[:length], dropped[:length]  # (T, V)
    ids = torch.as_tensor(list(response), dtype=torch.long, device=device)  # (T,)
    shift = token_shift(full, dropped, ids, kind=cfg.shift)  # (T,)
    reward = token_reward(full, dropped, ids, beta=cfg.beta, alpha=cfg.alpha)  # (T,)
    eligible = eligible_token_mask(ids, special_ids=excluded.special, punctuation_ids=excluded.punctuation)  # (T,)
    if cfg.exclude_function_words:
        if not excluded.pieces:
            raise ValueError("hscr.exclude_function_words needs ExcludedTokens.pieces (excluded_token_ids)")
        eligible &= ~function_word_mask([excluded.pieces[t] for t in response]).to(device)  # (T,)
    coupled = coupled_positions(shift, n=cfg.n_coupled, eligible=eligible).tolist()
    special = torch.as_tensor(sorted(excluded.special), dtype=torch.long, device=device)  # (S,)
    replacements: dict[int, int] = {}
    for p in coupled:
        token = hallucinated_replacement(
            full[p],
            dropped[p],
            beta=cfg.beta,
            alpha=cfg.alpha,
            exclude_token=int(ids[p]),
            never=special,
            view=cfg.plausible_view,
        )  # special tokens (eos, image, pad) never qualify, but still set the plausibility threshold
        if token is not None:
            replacements[p] = token
    ordered = [p for p in coupled if p in replacements]  # most coupled first
    levels = replacement_plan(ordered, levels=cfg.levels) if ordered else []
    return Scored(shift.tolist(), reward.tolist(), coupled, replacements, levels)


def forced_prefix(response: Sequence[int], scored: Scored, level: int) -> list[int]:
    """The edited prefix level ``level`` (0-based) decodes from: y_w up to its last replaced position."""
    positions = scored.levels[level]
    return edited_prefix(response, replacements={p: scored.replacements[p] for p in positions})
