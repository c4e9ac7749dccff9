"""HSCR stage 1: token-level self-contrastive rewards (METHOD.md, steps 1-5).

A second view of the image drops visual tokens; comparing the logits of the preferred response under the two
views tells which tokens depend on the image (large shift, high contrastive probability ``P_diff``) and which
the language prior would emit anyway (low ``P_diff``: the hallucination-prone replacements of stage 2).

Notation: ``z`` full-view logits, ``z'`` dropped-view logits, ``y`` emitted (teacher-forced) token ids.
Shapes: ``T`` response positions, ``V`` vocabulary, ``B`` batch, ``N`` visual tokens, ``D`` hidden size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

DropoutMode = Literal["zero", "remove"]
ShiftKind = Literal["logit", "logprob"]
# Where a replacement must be plausible (``hscr.plausible_view``): the full view (VCD's rule, METHOD's default),
# the dropped view (what the model would say without looking), or either.
PlausibleView = Literal["full", "dropped", "either"]

# Words that carry grammar, not findings: optionally never modality-coupled (``hscr.exclude_function_words``).
# Negations ("no", "not", "without") and "with" stay eligible: they decide what a finding is.
FUNCTION_WORDS = frozenset(
    {"a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "by", "as", "from", "into", "onto", "is",
     "are", "was", "were", "be", "been", "being", "this", "that", "these", "those", "there", "it", "its", "which"}
)  # fmt: skip


def example_generator(seed: int, example_id: str) -> torch.Generator:
    """A CPU generator seeded from ``sha256(f"{seed}:{example_id}")`` (first 8 bytes, big-endian, 63 bits).

    Stable across processes, machines and Python hash seeds, so the dropped view of an example is the same
    wherever and whenever it is scored.
    """
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return generator


def visual_token_dropout(
    visual_embeds: torch.Tensor,
    *,
    p_drop: float,
    generator: torch.Generator,
    mode: DropoutMode = "zero",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop ``round(p_drop · N)`` visual tokens chosen uniformly at random: the second view ``v'``.

    visual_embeds: (N, D) or (B, N, D), the projector output at the LLM input. One mask per call, shared by
    any leading dimension (the generator is per example, so callers make one call per example).
    ``round`` is Python's (halves go to the even count: 0.5 · 5 → 2). ``mode="zero"`` zeroes the dropped
    rows and keeps the shape (image-placeholder count unchanged); ``mode="remove"`` returns the kept rows.
    Returns (embeds, keep): embeds (N, D)/(B, N, D) or (N_keep, D)/(B, N_keep, D); keep (N,) bool.
    """
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
    num_tokens = visual_embeds.shape[-2]
    num_drop = round(p_drop * num_tokens)
    dropped = torch.randperm(num_tokens, generator=generator)[:num_drop]  # (num_drop,)
    keep = torch.ones(num_tokens, dtype=torch.bool)  # (N,)
    keep[dropped] = False
    keep = keep.to(visual_embeds.device)  # (N,)
    if mode == "zero":
        return visual_embeds.masked_fill(~keep[:, None], 0.0), keep  # (..., N, D)
    if mode == "remove":
        return visual_embeds[..., keep, :], keep  # (..., N_keep, D)
    raise ValueError(f"unknown dropout mode {mode!r}; expected 'zero' or 'remove'")


def contrastive_logits(full_logits: torch.Tensor, dropped_logits: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Visual-contrastive logits ``(1 + β) z − β z'``.

    full_logits, dropped_logits: (T, V) or (B, T, V). Returns the same shape.
    """
    return (1.0 + beta) * full_logits - beta * dropped_logits  # (..., T, V)


def plausible_mask(full_logits: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Plausible candidates: ``softmax(z)_v ≥ α · max_u softmax(z)_u`` (VCD's adaptive plausibility).

    Computed as ``z_v − max_u z_u ≥ log α`` (same inequality, the softmax normaliser cancels), which cannot
    underflow. α = 0 makes every token plausible; the argmax token is always plausible for α ≤ 1.
    full_logits: (T, V) or (B, T, V). Returns a bool mask of the same shape.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    logits = full_logits.float()  # (..., T, V)
    return logits - logits.amax(dim=-1, keepdim=True) >= log_alpha  # (..., T, V)


def contrastive_probs(
    full_logits: torch.Tensor, dropped_logits: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    """``P_diff = softmax((1 + β) z − β z')`` over the plausible tokens only; implausible tokens get 0.

    full_logits, dropped_logits: (T, V) or (B, T, V). Returns float32 probabilities of the same shape.
    """
    scores = contrastive_logits(full_logits.float(), dropped_logits.float(), beta=beta)  # (..., T, V)
    plausible = plausible_mask(full_logits, alpha=alpha)  # (..., T, V)
    return F.softmax(scores.masked_fill(~plausible, -math.inf), dim=-1)  # (..., T, V)


def _emitted(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``logits[..., t, y_t]``: (..., T, V), (..., T) → (..., T)."""
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (..., T)


def token_shift(
    full_logits: torch.Tensor, dropped_logits: torch.Tensor, token_ids: torch.Tensor, *, kind: ShiftKind = "logit"
) -> torch.Tensor:
    """Shift of the emitted token between the views: how much the image supports it.

    ``kind="logit"`` (default): ``Δ_t = z_t[y_t] − z'_t[y_t]`` on raw logits. ``kind="logprob"``:
    ``Δ_t = log softmax(z_t)[y_t] − log softmax(z'_t)[y_t]``, which a change that moves every logit of a
    position alike (as zeroing most visual tokens can) does not count.
    full_logits, dropped_logits: (T, V) or (B, T, V); token_ids: (T,) or (B, T). Returns float32 (T,) / (B, T).
    """
    full, dropped = full_logits.float(), dropped_logits.float()  # (..., T, V)
    if kind == "logprob":
        full, dropped = F.log_softmax(full, dim=-1), F.log_softmax(dropped, dim=-1)  # (..., T, V)
    elif kind != "logit":
        raise ValueError(f"unknown shift kind {kind!r}; expected 'logit' or 'logprob'")
    return _emitted(full, token_ids) - _emitted(dropped, token_ids)  # (..., T)


def token_reward(
    full_logits: torch.Tensor,
    dropped_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Implicit alignment reward of each emitted token: its contrastive probability ``P_diff_t[y_t]``.

    A probability in [0, 1], not its log: an emitted token outside the plausible set has ``P_diff = 0``,
    whose log would be −inf. full_logits, dropped_logits: (T, V) or (B, T, V); token_ids: (T,) or (B, T).
    Returns float32 (T,) / (B, T).
    """
    probs = contrastive_probs(full_logits, dropped_logits, beta=beta, alpha=alpha)  # (..., T, V)
    return _emitted(probs, token_ids)  # (..., T)


def punctuation_token_ids(token_texts: Sequence[str]) -> list[int]:
    """Ids whose decoded text has no letter or digit (punctuation, whitespace, empty): never coupled.

    token_texts[i] is the decoded text of token id i (e.g. ``tokenizer.convert_ids_to_tokens`` + decode).
    """
    return [i for i, text in enumerate(token_texts) if not any(ch.isalnum() for ch in text)]


def eligible_token_mask(
    token_ids: torch.Tensor,
    *,
    special_ids: Collection[int],
    punctuation_ids: Collection[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions that may be modality-coupled: not a special token, not punctuation-only, not padding.

    token_ids: (T,) or (B, T); attention_mask: same shape, 0 = padding. Returns a bool mask (T,) / (B, T).
    """
    excluded = torch.tensor(sorted({*special_ids, *punctuation_ids}), dtype=token_ids.dtype)  # (E,)
    eligible = ~torch.isin(token_ids, excluded.to(token_ids.device))  # (..., T)
    if attention_mask is not None:
        eligible &= attention_mask.bool()  # (..., T)
    return eligible


def coupled_positions(shift: torch.Tensor, *, n: int, eligible: torch.Tensor) -> torch.Tensor:
    """The top-``n`` modality-coupled positions: eligible positions with the largest shift ``Δ_t``.

    shift: (T,) float; eligible: (T,) bool. Returns int64 (≤ n,) positions in descending order of shift, ties
    broken by the lower position; fewer than ``n`` eligible positions → all of them. One example per call.
    """
    candidates = eligible.nonzero().squeeze(-1)  # (C,) ascending positions
    # A stable descending sort keeps tied candidates in ascending position order.
    order = torch.sort(shift[candidates], descending=True, stable=True).indices  # (C,)
    return candidates[order[:n]]  # (≤ n,)


def replacement_candidates(
    full_logits_t: torch.Tensor, dropped_logits_t: torch.Tensor, *, alpha: float, view: PlausibleView = "full"
) -> torch.Tensor:
    """Tokens plausible enough to be a hallucinated replacement at one position, before any is removed.

    ``view="full"``: ``plausible_mask`` on the full view (VCD's rule). ``"dropped"``: on the dropped view: the
    tokens the model finds plausible when most of the image is gone, i.e. what its language prior would say.
    ``"either"``: the union. full_logits_t, dropped_logits_t: (V,) (or (..., V)). Returns a bool mask, same shape.
    """
    if view == "full":
        return plausible_mask(full_logits_t, alpha=alpha)
    if view == "dropped":
        return plausible_mask(dropped_logits_t, alpha=alpha)
    if view == "either":
        return plausible_mask(full_logits_t, alpha=alpha) | plausible_mask(dropped_logits_t, alpha=alpha)
    raise ValueError(f"unknown plausible view {view!r}; expected 'full', 'dropped' or 'either'")


def hallucinated_replacement(
    full_logits_t: torch.Tensor,
    dropped_logits_t: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    exclude_token: int,
    never: torch.Tensor | Collection[int] = (),
    view: PlausibleView = "full",
) -> int | None:
    """The plausible candidate with the lowest ``P_diff`` at one position, other than ``exclude_token``.

    full_logits_t, dropped_logits_t: (V,). Plausibility is measured on the raw logits of ``view``
    (:func:`replacement_candidates`; the max over the whole vocabulary), and only then are ``exclude_token`` and
    the ``never`` ids (special tokens: eos, image, pad) removed from the candidates: a special token that is the
    argmax still sets the threshold.
    Lowest ``P_diff`` among the candidates is the lowest contrastive logit ``(1 + β) z − β z'`` among them
    (softmax is monotone; comparing logits avoids ties from underflow); equal logits → the lower token id.
    Returns ``None`` when no candidate is left (the position cannot be replaced; the caller skips it).
    """
    scores = contrastive_logits(full_logits_t.float(), dropped_logits_t.float(), beta=beta)  # (V,)
    candidates = replacement_candidates(full_logits_t, dropped_logits_t, alpha=alpha, view=view)  # (V,) raw logits
    never_ids = torch.as_tensor(list(never) if not isinstance(never, torch.Tensor) else never, dtype=torch.long)
    candidates[never_ids.to(candidates.device)] = False
    candidates[exclude_token] = False
    if not bool(candidates.any()):
        return None
    return int(torch.argmin(scores.masked_fill(~candidates, math.inf)))  # argmin returns the first minimum


def function_word_mask(pieces: Sequence[str], *, words: Collection[str] = FUNCTION_WORDS) -> torch.Tensor:
    """Positions whose token is a whole function word (one of ``words``, case-insensitive).

    pieces: (T,) the response's token texts with a leading space where a token starts a word (``"▁"`` / ``"Ġ"``
    written as a space). Position t is a function word iff ``pieces[t].strip().lower()`` is in ``words``, it
    starts a word (t = 0, a leading space, or the previous piece ends in a non-alphanumeric character) and it
    ends one (t = T − 1, or the next piece starts with a space or a non-alphanumeric character): the "an" of
    "medi|an" or the " a" of " a|bdomen" is not a function word. Returns a bool mask (T,).
    """
    lowered = {w.lower() for w in words}

    def starts(t: int) -> bool:
        return t == 0 or pieces[t][:1].isspace() or not pieces[t - 1][-1:].isalnum()

    def ends(t: int) -> bool:
        return t == len(pieces) - 1 or not pieces[t + 1][:1].isalnum()

    flags = [p.strip().lower() in lowered and starts(t) and ends(t) for t, p in enumerate(pieces)]
    return torch.tensor(flags, dtype=torch.bool)  # (T,)
