"""Multi-level DPO (hscr/loss.py) against hand-computed numbers.

r_i = γ (logπ(y_i) − logπ_ref(y_i));  loss = Σ_{i<j} W[i, j] · sp(r_i − r_j),
sp(m) = −log σ(m) = log(1 + e^−m).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hscr.loss import (
    adjacent_weights,
    all_pairs_weights,
    dpo_weights,
    explicit_weights,
    implicit_weights,
    level_weights,
    multilevel_dpo_loss,
    preferred_nll,
    reduce_loss,
)

GAMMA = 0.1
# One example, 4 levels: r = 0.1 · ([−5, −7, −6, −10] − [−6, −6.5, −6, −7]) = [0.1, −0.05, 0.0, −0.3]
POLICY_4 = torch.tensor([[-5.0, -7.0, -6.0, -10.0]])
REF_4 = torch.tensor([[-6.0, -6.5, -6.0, -7.0]])


def neg_log_sigmoid(margin: float) -> float:
    return math.log1p(math.exp(-margin))


def test_dpo_weights_equal_standard_sigmoid_dpo() -> None:
    """−log σ(γ((π_c − ref_c) − (π_r − ref_r))) for two examples:
    ex 0: π = (−10, −12), ref = (−11, −11.5): margin 0.1·(1 − (−0.5)) = 0.15 → log(1 + e^−0.15) = 0.620957
    ex 1: π = (−20, −18), ref = (−19, −18.5): margin 0.1·(−1 − 0.5) = −0.15 → log(1 + e^0.15) = 0.770957
    """
    policy = torch.tensor([[-10.0, -12.0], [-20.0, -18.0]])
    ref = torch.tensor([[-11.0, -11.5], [-19.0, -18.5]])
    per_example, metrics = multilevel_dpo_loss(policy, ref, gamma=GAMMA, pair_weights=dpo_weights())
    torch.testing.assert_close(per_example, torch.tensor([0.620957, 0.770957]), atol=1e-6, rtol=0)
    # The TRL / DPO-paper expression on the same tensors.
    trl = -F.logsigmoid(GAMMA * ((policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])))
    torch.testing.assert_close(per_example, trl)
    # TRL metrics: chosen r = [0.1, −0.1], rejected r = [−0.05, 0.05], margins [0.15, −0.15], accuracy 1/2.
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["rewards/margins_0_1"], torch.tensor(0.0))


def test_all_pairs_equals_explicit_plus_implicit_loops() -> None:
    """L_E = Σ_{j=1..3} −log σ(r_0 − r_j), L_I = Σ_{1≤j<m≤3} −log σ(r_j − r_m) with r = [0.1, −0.05, 0, −0.3]:
    L_E = 1.778369, L_I = 1.848754, L = 3.627123."""
    rewards = [0.1, -0.05, 0.0, -0.3]
    loss_e = sum(neg_log_sigmoid(rewards[0] - rewards[j]) for j in range(1, 4))
    loss_i = sum(neg_log_sigmoid(rewards[j] - rewards[m]) for j in range(1, 4) for m in range(j + 1, 4))
    assert loss_e == pytest.approx(1.778369, abs=1e-6)
    assert loss_i == pytest.approx(1.848754, abs=1e-6)
    per_example, _ = multilevel_dpo_loss(POLICY_4, REF_4, gamma=GAMMA, pair_weights=all_pairs_weights(4))
    assert float(per_example[0]) == pytest.approx(loss_e + loss_i, abs=1e-6)
    assert float(per_example[0]) == pytest.approx(3.627123, abs=1e-6)


def test_variants_pick_their_pairs() -> None:
    """Explicit only = L_E = 1.778369; implicit only = L_I = 1.848754; adjacent = sp of margins
    0.15, −0.05, 0.3 = 1.893772; per-level weights w_E = [1, 0.5, 0.25], w_I = 0.2:
    1·sp(0.15) + 0.5·sp(0.1) + 0.25·sp(0.4) + 0.2·(sp(−0.05) + sp(0.25) + sp(0.3)) = 1.441160."""
    cases = {
        "explicit": (explicit_weights(4), 1.778369),
        "implicit": (implicit_weights(4), 1.848754),
        "adjacent": (adjacent_weights(4), 1.893772),
        "levels": (level_weights(explicit=[1.0, 0.5, 0.25], implicit=0.2), 1.441160),
    }
    for name, (weights, expected) in cases.items():
        per_example, _ = multilevel_dpo_loss(POLICY_4, REF_4, gamma=GAMMA, pair_weights=weights)
        assert float(per_example[0]) == pytest.approx(expected, abs=1e-6), name


def test_metrics_for_four_levels() -> None:
    """r = [0.1, −0.05, 0, −0.3]: chosen 0.1; rejected mean(−0.05, 0, −0.3) = −0.116667; margins
    mean(0.15, 0.1, 0.4) = 0.216667; all-pairs accuracy: every pair but (1, 2) (−0.05) is ordered → 5/6.
    With w_E = 1, w_I = 0.5: Σw = 3 + 1.5 = 4.5, correct 3 + 0.5·2 = 4 → 0.888889."""
    _, metrics = multilevel_dpo_loss(POLICY_4, REF_4, gamma=GAMMA, pair_weights=all_pairs_weights(4))
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.1, abs=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(-0.116667, abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.216667, abs=1e-6)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(0.833333, abs=1e-6)
    assert float(metrics["rewards/margins_1_2"]) == pytest.approx(-0.05, abs=1e-6)
    assert float(metrics["rewards/margins_0_3"]) == pytest.approx(0.4, abs=1e-6)
    assert all(not value.requires_grad for value in metrics.values())
    weighted = level_weights(explicit=[1.0, 1.0, 1.0], implicit=0.5)
    _, metrics = multilevel_dpo_loss(POLICY_4, REF_4, gamma=GAMMA, pair_weights=weighted)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(0.888889, abs=1e-6)


def test_level_mask_equals_loss_on_shorter_list() -> None:
    # Example 0 lacks level 2 (garbage NaN log-probs there), example 1 lacks level 3.
    policy = torch.tensor([[-5.0, -7.0, math.nan, -10.0], [-5.0, -7.0, -6.0, math.nan]], requires_grad=True)
    ref = torch.tensor([[-6.0, -6.5, math.nan, -7.0], [-6.0, -6.5, -6.0, 0.0]])
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    per_example, metrics = multilevel_dpo_loss(
        policy, ref, gamma=GAMMA, pair_weights=all_pairs_weights(4), level_mask=mask
    )
    short_0, _ = multilevel_dpo_loss(
        torch.tensor([[-5.0, -7.0, -10.0]]),
        torch.tensor([[-6.0, -6.5, -7.0]]),
        gamma=GAMMA,
        pair_weights=all_pairs_weights(3),
    )
    short_1, _ = multilevel_dpo_loss(POLICY_4[:, :3], REF_4[:, :3], gamma=GAMMA, pair_weights=all_pairs_weights(3))
    torch.testing.assert_close(per_example, torch.cat([short_0, short_1]))
    # By hand, example 1: r = [0.1, −0.05, 0]:
    #   sp(0.15) + sp(0.1) + sp(−0.05) = 0.620957 + 0.644397 + 0.718460 = 1.983813
    assert float(per_example.detach()[1]) == pytest.approx(1.983813, abs=1e-6)
    per_example.sum().backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    assert policy.grad[0, 2] == 0 and policy.grad[1, 3] == 0
    # rejected: levels {1, 3} of ex 0 and {1, 2} of ex 1 → mean(−0.05, −0.3, −0.05, 0) = −0.1
    assert float(metrics["rewards/rejected"]) == pytest.approx(-0.1, abs=1e-6)
    # margins_2_3 has no example where both exist → NaN
    assert math.isnan(float(metrics["rewards/margins_2_3"]))


def test_gradients_reach_policy_only() -> None:
    """d loss / d π_c = −γ σ(−m), d loss / d π_r = +γ σ(−m): m = 0.15 → ∓0.0462570; m = −0.15 → ∓0.0537430."""
    policy = torch.tensor([[-10.0, -12.0], [-20.0, -18.0]], requires_grad=True)
    ref = torch.tensor([[-11.0, -11.5], [-19.0, -18.5]], requires_grad=True)
    per_example, _ = multilevel_dpo_loss(policy, ref, gamma=GAMMA, pair_weights=dpo_weights())
    per_example.sum().backward()
    expected = torch.tensor([[-0.0462570, 0.0462570], [-0.0537430, 0.0537430]])
    assert policy.grad is not None
    torch.testing.assert_close(policy.grad, expected, atol=1e-7, rtol=0)
    assert ref.grad is None


def test_split_batch_mean_weighted_by_size_equals_global_mean() -> None:
    policy = torch.tensor([[-5.0, -7.0, -6.0], [-3.0, -2.0, -8.0], [-9.0, -9.5, -9.1], [-1.0, -4.0, -2.0]])
    ref = torch.tensor([[-6.0, -6.5, -6.0], [-3.5, -2.5, -7.0], [-9.0, -9.0, -9.0], [-1.5, -3.0, -2.5]])
    weights = all_pairs_weights(3)
    whole, _ = multilevel_dpo_loss(policy, ref, gamma=GAMMA, pair_weights=weights)
    part_a, _ = multilevel_dpo_loss(policy[:3], ref[:3], gamma=GAMMA, pair_weights=weights)
    part_b, _ = multilevel_dpo_loss(policy[3:], ref[3:], gamma=GAMMA, pair_weights=weights)
    combined = (3 * reduce_loss(part_a, reduction="mean") + 1 * reduce_loss(part_b, reduction="mean")) / 4
    torch.testing.assert_close(combined, reduce_loss(whole, reduction="mean"))
    summed = reduce_loss(part_a, reduction="sum") + reduce_loss(part_b, reduction="sum")
    torch.testing.assert_close(summed, reduce_loss(whole, reduction="sum"))


def test_reduce_loss_values_and_unknown_reduction() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0])
    assert float(reduce_loss(losses, reduction="mean")) == 3.0
    assert float(reduce_loss(losses, reduction="sum")) == 9.0
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(losses, reduction="max")  # type: ignore[arg-type]


def test_weight_builders_exact_matrices() -> None:
    assert all_pairs_weights(4).tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert explicit_weights(4).tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert implicit_weights(4).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert adjacent_weights(4).tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert adjacent_weights(1).tolist() == [[0]]
    assert dpo_weights().tolist() == [[0, 1], [0, 0]]
    assert level_weights(explicit=[1.0], implicit=0.0).tolist() == dpo_weights().tolist()
    assert level_weights(explicit=[1.0, 0.5, 0.25], implicit=0.25).tolist() == [
        [0, 1, 0.5, 0.25],
        [0, 0, 0.25, 0.25],
        [0, 0, 0, 0.25],
        [0, 0, 0, 0],
    ]
    nested = [[0.0, 0.75, 0.5], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    assert level_weights(explicit=[1.0, 1.0, 1.0], implicit=nested).tolist() == [
        [0, 1, 1, 1],
        [0, 0, 0.75, 0.5],
        [0, 0, 0, 2],
        [0, 0, 0, 0],
    ]


def test_weights_that_reverse_preferences_are_rejected() -> None:
    with pytest.raises(ValueError, match="below the diagonal"):
        level_weights(explicit=[1.0, 1.0], implicit=[[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="below the diagonal"):
        multilevel_dpo_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            gamma=GAMMA,
            pair_weights=torch.tensor([[0.0, 0.0], [1.0, 0.0]]),
        )


# --- the NLL term on y_w (RPO / TRL rpo_alpha) ---------------------------------------------------------------

DPO_POLICY = torch.tensor([[-10.0, -12.0], [-20.0, -18.0]])
DPO_REF = torch.tensor([[-11.0, -11.5], [-19.0, -18.5]])


def test_preferred_nll_is_per_token_by_hand() -> None:
    """nll = −logπ(y_w) / |y_w|: −(−10) / 4 = 2.5, −(−20) / 5 = 4.0; a count of 0 is taken as 1: 3.0."""
    nll = preferred_nll(torch.tensor([-10.0, -20.0, -3.0]), torch.tensor([4.0, 5.0, 0.0]))
    torch.testing.assert_close(nll, torch.tensor([2.5, 4.0, 3.0]))


def test_nll_term_adds_lambda_times_nll_with_its_gradient() -> None:
    """λ = 0.5, |y_w| = (4, 5): loss = DPO + 0.5 · (2.5, 4.0) = (0.620957 + 1.25, 0.770957 + 2.0);
    d loss / d π_c = −γ σ(−m) − λ / |y_w| = −0.0462570 − 0.125, −0.0537430 − 0.1; rejected unchanged."""
    policy = DPO_POLICY.clone().requires_grad_(True)
    tokens = torch.tensor([4.0, 5.0])
    per_example, metrics = multilevel_dpo_loss(
        policy, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights(), nll_weight=0.5, chosen_tokens=tokens
    )
    torch.testing.assert_close(per_example.detach(), torch.tensor([1.870957, 2.770957]), atol=1e-6, rtol=0)
    assert float(metrics["nll_loss"]) == pytest.approx(3.25)  # mean(2.5, 4.0)
    per_example.sum().backward()
    expected = torch.tensor([[-0.1712570, 0.0462570], [-0.1537430, 0.0537430]])
    assert policy.grad is not None
    torch.testing.assert_close(policy.grad, expected, atol=1e-7, rtol=0)


def test_nll_weight_zero_is_todays_loss_and_missing_examples_add_nothing() -> None:
    plain, plain_metrics = multilevel_dpo_loss(DPO_POLICY, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights())
    tokens = torch.tensor([4.0, 5.0])
    off, metrics = multilevel_dpo_loss(DPO_POLICY, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights(),
                                       chosen_tokens=tokens)  # fmt: skip
    torch.testing.assert_close(off, plain)
    assert "nll_loss" not in plain_metrics and float(metrics["nll_loss"]) == pytest.approx(3.25)
    # example 1 is a filler (no level exists): neither its pairs nor its NLL count, even with NaN log-probs
    policy = torch.tensor([[-10.0, -12.0], [math.nan, math.nan]])
    mask = torch.tensor([[True, True], [False, False]])
    per_example, metrics = multilevel_dpo_loss(policy, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights(),
                                               level_mask=mask, nll_weight=0.5, chosen_tokens=tokens)  # fmt: skip
    torch.testing.assert_close(per_example, torch.tensor([1.870957, 0.0]), atol=1e-6, rtol=0)
    assert float(metrics["nll_loss"]) == pytest.approx(2.5)


def test_nll_weight_needs_token_counts_and_is_not_negative() -> None:
    with pytest.raises(ValueError, match="nll_weight"):
        multilevel_dpo_loss(DPO_POLICY, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights(), nll_weight=0.5)
    with pytest.raises(ValueError, match="nll_weight"):
        multilevel_dpo_loss(DPO_POLICY, DPO_REF, gamma=GAMMA, pair_weights=dpo_weights(), nll_weight=-1.0,
                            chosen_tokens=torch.tensor([4.0, 5.0]))  # fmt: skip
