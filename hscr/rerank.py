"""HSCR stage 2: similarity-aware re-ranking of candidate negatives into graded levels (METHOD.md, step 7).

Each candidate negative is scored by its similarity to ``y_w`` (cosine of sentence embeddings, or the lexical
fallback). The most similar candidate is the least wrong, so the ranked list ``y_w ≻ y_l1 ≻ y_l2 ≻ ...`` runs
from the most to the least similar kept candidate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

# A gap written as a decimal (0.95 − 0.85 ≥ 0.1) must count even though floats give 0.09999999999999998.
GAP_TOLERANCE = 1e-9


def select_levels(
    similarities: Sequence[float] | torch.Tensor,
    *,
    k: int,
    min_gap: float,
    max_similarity: float | None = None,
) -> list[int]:
    """Pick at most ``k`` candidates whose adjacent similarities differ by at least ``min_gap``.

    similarities: (C,), ``similarities[m]`` of candidate ``m`` to ``y_w``. Rule, precisely:
    1. drop NaNs and, if ``max_similarity`` is set, candidates above it (near-copies of ``y_w``);
    2. sort by similarity, descending; equal similarities keep candidate order (lower index first);
    3. walk that order once: keep the first candidate, then keep a candidate iff
       ``last_kept_similarity − similarity ≥ min_gap − GAP_TOLERANCE``; stop after ``k`` kept.
    This greedy walk anchors on the most similar candidate; it does not search for the largest spread set.
    Returns the kept candidate indices in rank order (most similar first = least wrong = level 1).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    values = similarities.tolist() if isinstance(similarities, torch.Tensor) else similarities
    sims = [float(s) for s in values]
    ceiling = math.inf if max_similarity is None else max_similarity
    usable = [i for i, s in enumerate(sims) if s <= ceiling]  # NaN fails every comparison: dropped
    kept: list[int] = []
    for index in sorted(usable, key=lambda i: -sims[i]):  # sorted() is stable: ties keep candidate order
        if len(kept) == k:
            break
        if not kept or sims[kept[-1]] - sims[index] >= min_gap - GAP_TOLERANCE:
            kept.append(index)
    return kept


def lexical_similarity(a_tokens: Sequence[Hashable], b_tokens: Sequence[Hashable]) -> float:
    """Token F1 between two token sequences (SQuAD-style, multiset overlap, order ignored).

    ``overlap = Σ_w min(count_a(w), count_b(w))``, ``P = overlap/|a|``, ``R = overlap/|b|``,
    ``F1 = 2PR/(P + R)``. Both empty → 1.0; one empty or no overlap → 0.0.
    """
    if not a_tokens and not b_tokens:
        return 1.0
    overlap = sum((Counter(a_tokens) & Counter(b_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(a_tokens), overlap / len(b_tokens)
    return 2 * precision * recall / (precision + recall)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``a·b / (‖a‖ ‖b‖)`` along the last axis (a zero vector gives 0).

    a, b: (D,) or (C, D), broadcast against each other. Returns () or (C,).
    """
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)  # (C,)


def coupled_recall(
    reference: Sequence[Hashable], coupled: Sequence[int], replaced: Sequence[int], candidate: Sequence[Hashable]
) -> float:
    """Share of y_w's modality-coupled tokens that a candidate negative still says: ``1 − lost / n``.

    reference: y_w's tokens; coupled: its n modality-coupled positions (``coupled_positions``, n ≥ 1); replaced:
    the positions the candidate's level replaced (a subset of ``coupled``, non-empty); candidate: the candidate's
    tokens, which start with y_w up to the last replaced position with the replacements swapped in (the edited
    prefix, ``hscr.replace.edited_prefix``) and then continue freely.
    Lost: every replaced position, plus every coupled token after the edited prefix that the continuation does not
    say (multiset match against the candidate's tokens after the prefix). Coupled positions inside the prefix
    that were not replaced keep y_w's token by construction. So a level that replaces m coupled tokens scores at
    most ``1 − m/n``: levels are graded by how much image-dependent content they lose, whatever the answer's
    length, and ``min_gap = 1/n`` or less separates one replacement from the next.
    """
    if not coupled:
        raise ValueError("coupled_recall needs at least one coupled position")
    if not replaced or not set(replaced) <= set(coupled):
        raise ValueError(f"replaced positions {list(replaced)} must be a non-empty subset of coupled {list(coupled)}")
    cut = max(replaced) + 1  # the edited prefix's length
    if len(candidate) < cut:
        raise ValueError(f"candidate of {len(candidate)} tokens is shorter than its edited prefix ({cut})")
    said = Counter(candidate[cut:])  # what the continuation says
    lost = len(set(replaced))
    for position in sorted(p for p in coupled if p >= cut):
        token = reference[position]
        if said[token] > 0:
            said[token] -= 1
        else:
            lost += 1
    return 1.0 - lost / len(coupled)
