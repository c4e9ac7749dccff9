"""HSCR stage 3: multi-level preference optimisation as all-pairs DPO over a ranked list (METHOD.md).

Levels run along the last axis, 0 = preferred ``y_w``, then ``y_l1 ≻ y_l2 ≻ ...`` (less wrong first). With
implicit rewards ``r_i = γ (log π_θ(y_i) − log π_ref(y_i))`` the loss of one example is

    L = Σ_{i<j} W[i, j] · (−log σ(r_i − r_j))

and the pair-weight matrix ``W`` (``W[i, j]`` weighs "level i beats level j", strictly upper-triangular)
picks the variant: the paper's ``L_E + L_I`` (all pairs), explicit or implicit only, adjacent pairs, per-level
sweep weights, or plain DPO (``k = 1``). There is one loss function and no per-variant branch.

An optional NLL term on ``y_w`` (RPO, Pang et al. 2024; TRL's ``rpo_alpha``; not in the HSCR paper) adds
``λ · (−log π_θ(y_w) / |y_w|)`` per example: DPO-family losses can lower the preferred answer's likelihood while
widening the margins, and the NLL term holds it up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]

# Per-pair margin metrics ("rewards/margins_i_j") are logged up to this many levels (y_w + 3 negatives).
MAX_PAIR_METRIC_LEVELS = 4


def all_pairs_weights(num_levels: int) -> torch.Tensor:
    """The paper's ``L_E + L_I``: ``W[i, j] = 1`` for every ``i < j``. Returns (L, L) float32."""
    return torch.ones(num_levels, num_levels).triu(diagonal=1)  # (L, L)


def explicit_weights(num_levels: int) -> torch.Tensor:
    """``L_E`` only: ``W[0, j] = 1`` for ``j ≥ 1`` (preferred vs every dispreferred level). Returns (L, L)."""
    weights = torch.zeros(num_levels, num_levels)  # (L, L)
    weights[0, 1:] = 1.0
    return weights


def implicit_weights(num_levels: int) -> torch.Tensor:
    """``L_I`` only: ``W[j, m] = 1`` for ``1 ≤ j < m`` (among dispreferred levels). Returns (L, L)."""
    weights = all_pairs_weights(num_levels)  # (L, L)
    weights[0, :] = 0.0
    return weights


def adjacent_weights(num_levels: int) -> torch.Tensor:
    """Adjacent pairs only: ``W[i, i + 1] = 1``. Returns (L, L) float32."""
    return torch.ones(num_levels - 1).diag(diagonal=1) if num_levels > 1 else torch.zeros(1, 1)  # (L, L)


def dpo_weights() -> torch.Tensor:
    """Plain DPO (``k = 1``): ``[[0, 1], [0, 0]]``. Returns (2, 2) float32."""
    return torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # (2, 2)


def level_weights(*, explicit: Sequence[float], implicit: float | Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-level weights: ``W[0, j] = w_E_j`` and ``W[j, m] = w_I_jm`` (``1 ≤ j < m ≤ k``).

    explicit: ``[w_E_1, ..., w_E_k]``; implicit: one float for every ``j < m``, or a (k, k) nested list
    with ``implicit[j − 1][m − 1] = w_I_jm``, zero on and below its diagonal. Returns (k + 1, k + 1) float32.
    """
    num_neg = len(explicit)
    if isinstance(implicit, int | float):
        implicit_block = torch.full((num_neg, num_neg), float(implicit)).triu(diagonal=1)  # (k, k)
    else:
        implicit_block = torch.tensor(implicit, dtype=torch.float32).reshape(num_neg, num_neg)  # (k, k)
    weights = torch.zeros(num_neg + 1, num_neg + 1)  # (L, L)
    weights[0, 1:] = torch.tensor(explicit, dtype=torch.float32)
    weights[1:, 1:] = implicit_block
    _check_weights(weights)
    return weights


def _check_weights(weights: torch.Tensor) -> None:
    """Reject a weight matrix that is not (L, L) strictly upper-triangular: it would reverse preferences."""
    if weights.dim() != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"pair weights must be (L, L), got {tuple(weights.shape)}")
    if bool((weights.detach().cpu().tril() != 0).any()):
        raise ValueError("pair weights must be zero on and below the diagonal (W[i, j]: level i beats j)")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; NaN when nothing is selected."""
    return torch.where(mask, values, 0.0).sum() / mask.sum()  # ()


def preferred_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised negative log-likelihood of ``y_w``: ``nll_b = −log π_θ(y_w | x, I) / |y_w|``.

    chosen_logps: (B,) summed log-probs of ``y_w``; chosen_tokens: (B,) its response token counts (a count
    below 1 is taken as 1). Returns (B,), the mean per-token NLL of each example's ``y_w``. TRL's ``rpo_alpha``
    averages over all chosen tokens of the batch instead; per example, a long answer weighs as much as a short one.
    """
    return -chosen_logps / chosen_tokens.to(chosen_logps).clamp(min=1.0)  # (B,)


def multilevel_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    gamma: float,
    pair_weights: torch.Tensor,
    level_mask: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-level DPO: ``loss_b = Σ_{i<j} W[i, j] · (−log σ(r_i − r_j)) + λ · nll_b``, ``r = γ (logπ − logπ_ref)``.

    policy_logps, ref_logps: (B, L) summed response log-probs, level 0 preferred; ``ref_logps`` is detached.
    pair_weights: (L, L) strictly upper-triangular. level_mask: (B, L) bool, True where the level exists
    (level 0 must); pairs touching a missing level contribute 0, whatever its log-probs hold (NaN included).
    nll_weight: λ ≥ 0 of the NLL term on ``y_w`` (``preferred_nll``, 0 for an example without ``y_w``);
    chosen_tokens: (B,) token counts of ``y_w``, needed when λ > 0; whenever given, ``nll_loss`` (the mean
    ``nll_b`` over examples with ``y_w``) is among the metrics.
    Returns (per_example_loss (B,), metrics): metrics are detached TRL-named scalars, see ``_reward_metrics``.
    """
    _check_weights(pair_weights)
    if nll_weight < 0 or (nll_weight > 0 and chosen_tokens is None):
        raise ValueError(f"nll_weight must be >= 0 and needs chosen_tokens when > 0, got {nll_weight}")
    if level_mask is None:
        level_mask = torch.ones_like(policy_logps, dtype=torch.bool)  # (B, L)
    weights = pair_weights.to(policy_logps)  # (L, L)
    rewards = gamma * (policy_logps - ref_logps.detach())  # (B, L)
    rewards = torch.where(level_mask, rewards, 0.0)  # (B, L) missing levels zeroed so no NaN reaches grads
    margins = rewards[:, :, None] - rewards[:, None, :]  # (B, L, L) [b, i, j] = r_i − r_j
    pair_valid = level_mask[:, :, None] & level_mask[:, None, :]  # (B, L, L)
    pair_weight = torch.where(pair_valid, weights, 0.0)  # (B, L, L)
    per_example = (pair_weight * -F.logsigmoid(margins)).sum(dim=(1, 2))  # (B,)
    metrics = _reward_metrics(rewards.detach(), margins.detach(), pair_weight, level_mask)
    if chosen_tokens is not None:
        nll = torch.where(level_mask[:, 0], preferred_nll(policy_logps[:, 0], chosen_tokens), 0.0)  # (B,)
        metrics["nll_loss"] = _masked_mean(nll.detach(), level_mask[:, 0])
        if nll_weight > 0:
            per_example = per_example + nll_weight * nll  # (B,)
    return per_example, metrics


def _reward_metrics(
    rewards: torch.Tensor, margins: torch.Tensor, pair_weight: torch.Tensor, level_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL-named batch metrics (NaN where nothing qualifies).

    rewards/chosen: mean ``r_0``; rewards/rejected: mean ``r_j`` over existing levels ``j ≥ 1``;
    rewards/margins: mean ``r_0 − r_j`` over the same; rewards/accuracies: ``Σ W·1[r_i > r_j] / Σ W`` over
    weighted existing pairs; rewards/margins_i_j: mean ``r_i − r_j`` where both exist (L ≤ 4).
    rewards (B, L), margins (B, L, L), pair_weight (B, L, L), level_mask (B, L).
    """
    pair_weight = pair_weight.detach()  # (B, L, L)
    rejected_mask = level_mask.clone()  # (B, L)
    rejected_mask[:, 0] = False
    metrics = {
        "rewards/chosen": _masked_mean(rewards[:, 0], level_mask[:, 0]),
        "rewards/rejected": _masked_mean(rewards, rejected_mask),
        "rewards/margins": _masked_mean(margins[:, 0, :], rejected_mask),
        "rewards/accuracies": (pair_weight * (margins > 0)).sum() / pair_weight.sum(),
    }
    num_levels = rewards.shape[1]
    if num_levels <= MAX_PAIR_METRIC_LEVELS:
        for i in range(num_levels):
            for j in range(i + 1, num_levels):
                both = level_mask[:, i] & level_mask[:, j]  # (B,)
                metrics[f"rewards/margins_{i}_{j}"] = _masked_mean(margins[:, i, j], both)
    return metrics


def reduce_loss(per_example: torch.Tensor, *, reduction: Reduction) -> torch.Tensor:
    """Reduce (B,) per-example losses (each already a sum over pairs) to a scalar: ``mean`` or ``sum``."""
    if reduction == "mean":
        return per_example.mean()  # ()
    if reduction == "sum":
        return per_example.sum()  # ()
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")
