"""Stage 1 maths against hand-computed numbers (hscr/rewards.py)."""

from __future__ import annotations

import pytest
import torch

from hscr.rewards import (
    contrastive_logits,
    contrastive_probs,
    coupled_positions,
    eligible_token_mask,
    example_generator,
    function_word_mask,
    hallucinated_replacement,
    plausible_mask,
    punctuation_token_ids,
    replacement_candidates,
    token_reward,
    token_shift,
    visual_token_dropout,
)

# One position, V = 3: z = [2, 1, 0], z' = [1, 1, 1], β = 0.9.
#   (1 + β) z − β z' = [3.8 − 0.9, 1.9 − 0.9, 0 − 0.9] = [2.9, 1.0, −0.9]
#   softmax(z) = [e², e¹, e⁰] / (e² + e + 1) = [0.665241, 0.244728, 0.090031]
#   α = 0.1: threshold 0.0665241 → all plausible;
#     P_diff = softmax([2.9, 1.0, −0.9]) = [18.174145, 2.718282, 0.406570] / 21.298997
#            = [0.853286, 0.127625, 0.019089]
#   α = 0.2: threshold 0.133048 > 0.090031 → token 2 implausible;
#     P_diff = [1, e^−1.9, 0] / (1 + e^−1.9) = [0.869892, 0.130108, 0]
Z = torch.tensor([[2.0, 1.0, 0.0]])
Z_DROP = torch.tensor([[1.0, 1.0, 1.0]])


def test_contrastive_logits_hand_computed() -> None:
    torch.testing.assert_close(contrastive_logits(Z, Z_DROP, beta=0.9), torch.tensor([[2.9, 1.0, -0.9]]))


def test_plausible_mask_threshold_on_full_view_probs() -> None:
    assert plausible_mask(Z, alpha=0.1).tolist() == [[True, True, True]]
    assert plausible_mask(Z, alpha=0.2).tolist() == [[True, True, False]]
    # α = 0.5: threshold 0.332620 > 0.244728 → only the argmax; α = 0 → everything.
    assert plausible_mask(Z, alpha=0.5).tolist() == [[True, False, False]]
    assert plausible_mask(Z, alpha=0.0).tolist() == [[True, True, True]]


def test_contrastive_probs_all_plausible() -> None:
    expected = torch.tensor([[0.853286, 0.127625, 0.019089]])
    torch.testing.assert_close(contrastive_probs(Z, Z_DROP, beta=0.9, alpha=0.1), expected, atol=1e-6, rtol=0)


def test_contrastive_probs_implausible_token_gets_zero() -> None:
    expected = torch.tensor([[0.869892, 0.130108, 0.0]])
    torch.testing.assert_close(contrastive_probs(Z, Z_DROP, beta=0.9, alpha=0.2), expected, atol=1e-6, rtol=0)


def test_contrastive_probs_batched_shape_and_rows_sum_to_one() -> None:
    full = torch.stack([torch.cat([Z, Z.flip(-1)]), torch.cat([Z_DROP, Z])])  # (B=2, T=2, V=3)
    dropped = torch.stack([torch.cat([Z_DROP, Z_DROP]), torch.cat([Z, Z_DROP])])  # (2, 2, 3)
    probs = contrastive_probs(full, dropped, beta=0.9, alpha=0.1)
    assert probs.shape == (2, 2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.853286, 0.127625, 0.019089]), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[0, 1], torch.tensor([0.019089, 0.127625, 0.853286]), atol=1e-6, rtol=0)


def test_token_shift_and_reward() -> None:
    # T = 2: position 0 as above; position 1: z = [0, 3, 1], z' = [0, 1, 1].
    full = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    dropped = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    tokens = torch.tensor([0, 1])
    # Δ = [z_0[0] − z'_0[0], z_1[1] − z'_1[1]] = [2 − 1, 3 − 1]
    torch.testing.assert_close(token_shift(full, dropped, tokens), torch.tensor([1.0, 2.0]))
    # Position 1: (1.9)[0, 3, 1] − 0.9[0, 1, 1] = [0, 4.8, 1.0]; softmax(z) = [0.042010, 0.843795, 0.114195],
    # α = 0.1 threshold 0.084380 → token 0 implausible; P_diff[1] = 1 / (1 + e^−3.8) = 0.978119.
    expected = torch.tensor([0.853286, 0.978119])
    torch.testing.assert_close(token_reward(full, dropped, tokens, beta=0.9, alpha=0.1), expected, atol=1e-6, rtol=0)
    batched = token_shift(full[None], dropped[None], tokens[None])  # (1, 2)
    torch.testing.assert_close(batched, torch.tensor([[1.0, 2.0]]))


def test_token_shift_on_log_probs() -> None:
    # Position 0: z = [2, 1, 0], z' = [1, 1, 1], y = 0. log softmax(z)[0] = 2 − log(e² + e + 1)
    #   = 2 − log(11.107338) = 2 − 2.407606 = −0.407606; log softmax(z')[0] = −log 3 = −1.098612
    #   → Δ = −0.407606 + 1.098612 = 0.691006 (the logit shift is 2 − 1 = 1).
    # Position 1: z' = z − 2 everywhere: logit shift 2, log-prob shift 0 (the normaliser moves with it).
    full = torch.tensor([[2.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    dropped = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -2.0]])
    tokens = torch.tensor([0, 1])
    torch.testing.assert_close(token_shift(full, dropped, tokens, kind="logit"), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(
        token_shift(full, dropped, tokens, kind="logprob"), torch.tensor([0.691006, 0.0]), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="shift kind"):
        token_shift(full, dropped, tokens, kind="prob")  # type: ignore[arg-type]


def test_token_reward_of_implausible_emitted_token_is_zero() -> None:
    assert token_reward(Z, Z_DROP, torch.tensor([2]), beta=0.9, alpha=0.2).tolist() == [0.0]


def test_coupled_positions_top_n_ties_and_eligibility() -> None:
    shift = torch.tensor([0.5, 2.0, -1.0, 2.0, 3.0, 0.1])
    eligible = torch.tensor([True, True, True, True, False, True])
    # Eligible shifts: pos0 0.5, pos1 2.0, pos2 −1.0, pos3 2.0, pos5 0.1 (pos4's 3.0 is excluded);
    # descending with the tie 1/3 broken by lower position: 1, 3, 0, 5, 2.
    assert coupled_positions(shift, n=3, eligible=eligible).tolist() == [1, 3, 0]
    assert coupled_positions(shift, n=10, eligible=eligible).tolist() == [1, 3, 0, 5, 2]
    assert coupled_positions(shift, n=3, eligible=torch.zeros(6, dtype=torch.bool)).tolist() == []


def test_eligible_token_mask_excludes_special_punctuation_and_padding() -> None:
    # ids: 1 = <s>, 2 = </s>, 0 = <pad>, 7 = ",", others words.
    token_ids = torch.tensor([[1, 5, 7, 6, 2, 0], [1, 8, 9, 2, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    mask = eligible_token_mask(token_ids, special_ids={0, 1, 2}, punctuation_ids=[7], attention_mask=attention)
    assert mask.tolist() == [
        [False, True, False, True, False, False],
        [False, True, True, False, False, False],
    ]
    # Padding that reuses a word id (5) is still excluded through the attention mask.
    pad_as_word = eligible_token_mask(
        torch.tensor([5, 5]), special_ids=[], punctuation_ids=[], attention_mask=torch.tensor([1, 0])
    )
    assert pad_as_word.tolist() == [True, False]


def test_punctuation_token_ids() -> None:
    texts = ["<s>", ",", " ", "nod", ".", "3", "", " left", "?!"]
    # No letter or digit: ",", " ", ".", "", "?!" (the "<s>" text has letters: special ids exclude it).
    assert punctuation_token_ids(texts) == [1, 2, 4, 6, 8]


def test_hallucinated_replacement_lowest_p_diff_excluding_original() -> None:
    # α = 0.1: P_diff = [0.853, 0.128, 0.019] → lowest other than token 0 is token 2.
    assert hallucinated_replacement(Z[0], Z_DROP[0], beta=0.9, alpha=0.1, exclude_token=0) == 2
    # The lowest is the original itself → the next lowest, token 1.
    assert hallucinated_replacement(Z[0], Z_DROP[0], beta=0.9, alpha=0.1, exclude_token=2) == 1
    # α = 0.2 makes token 2 implausible → token 1.
    assert hallucinated_replacement(Z[0], Z_DROP[0], beta=0.9, alpha=0.2, exclude_token=0) == 1
    # α = 0.5: only token 0 is plausible and it is the original → no replacement.
    assert hallucinated_replacement(Z[0], Z_DROP[0], beta=0.9, alpha=0.5, exclude_token=0) is None


def test_plausibility_is_measured_before_special_tokens_are_removed() -> None:
    # V = 4, token 0 = eos (special, the argmax), the emitted token is 1. z = [5, 2, 0, −1], z' = 0, α = 0.1:
    # plausible iff z_v − max z ≥ log 0.1 = −2.302585. Token 1: 2 − 5 = −3, token 2: −5 (p = e^−5 = 0.0067·p_max)
    # → only eos is plausible; eos is never a replacement and 1 is the original → no replacement. Masking eos
    # first (the old order) would move the max to 2.0 and let token 2 pass (0 − 2 = −2 ≥ −2.30).
    full = torch.tensor([5.0, 2.0, 0.0, -1.0])
    assert hallucinated_replacement(full, torch.zeros(4), beta=0.9, alpha=0.1, exclude_token=1, never=[0]) is None
    # z = [5, 4, 3, 0]: threshold 5 − 2.302585 = 2.697415 → 0, 1, 2 plausible; eos and the original removed → 2.
    full = torch.tensor([5.0, 4.0, 3.0, 0.0])
    assert hallucinated_replacement(full, torch.zeros(4), beta=0.9, alpha=0.1, exclude_token=1, never=[0]) == 2
    # `never` as a tensor works the same; contrastive logits 1.9·z = [9.5, 7.6, 5.7, 0], eos kept: still 2.
    never = torch.tensor([0])
    assert hallucinated_replacement(full, torch.zeros(4), beta=0.9, alpha=0.1, exclude_token=1, never=never) == 2
    assert hallucinated_replacement(full, torch.zeros(4), beta=0.9, alpha=0.1, exclude_token=1) == 2


def test_function_word_mask_whole_words_only() -> None:
    pieces = [" The", " nod", "ule", " is", " medi", "an", " a", "bdomen", " of", " the", " left", "."]
    # " The", " is", " of", " the": whole function words. "an" continues "medi" and " a" is continued by
    # "bdomen": not words of their own.
    expected = [True, False, False, True, False, False, False, False, True, True, False, False]
    assert function_word_mask(pieces).tolist() == expected
    # A word starts after a non-alphanumeric piece and ends before one; t = 0 starts a word without a space.
    assert function_word_mask(["a", " mass", "(", "the", ")"]).tolist() == [True, False, False, True, False]
    assert function_word_mask([" left"], words={"LEFT"}).tolist() == [True]


def test_hallucinated_replacement_tie_goes_to_lower_id() -> None:
    # z = [3, 1, 1], z' = 0: contrastive logits [5.7, 1.9, 1.9]; tokens 1 and 2 tie → 1.
    full = torch.tensor([3.0, 1.0, 1.0])
    assert hallucinated_replacement(full, torch.zeros(3), beta=0.9, alpha=0.1, exclude_token=0) == 1


def test_dropout_zero_mode_counts_and_rows() -> None:
    embeds = torch.arange(1.0, 21.0).reshape(10, 2)  # (N=10, D=2), no zero rows
    dropped, keep = visual_token_dropout(embeds, p_drop=0.7, generator=example_generator(0, "a"))
    assert keep.shape == (10,) and int(keep.sum()) == 3  # round(0.7 · 10) = 7 dropped
    assert dropped.shape == (10, 2)
    assert torch.equal(dropped[keep], embeds[keep])
    assert bool((dropped[~keep] == 0).all())


def test_dropout_remove_mode_and_batched_input() -> None:
    embeds = torch.arange(1.0, 41.0).reshape(2, 10, 2)  # (B=2, N=10, D=2)
    kept, keep = visual_token_dropout(embeds, p_drop=0.3, generator=example_generator(0, "a"), mode="remove")
    assert kept.shape == (2, 7, 2)
    assert torch.equal(kept, embeds[:, keep, :])


def test_dropout_is_reproducible_per_example_and_varies_across_examples() -> None:
    embeds = torch.ones(64, 4)
    _, keep_a1 = visual_token_dropout(embeds, p_drop=0.5, generator=example_generator(7, "ex-1"))
    _, keep_a2 = visual_token_dropout(embeds, p_drop=0.5, generator=example_generator(7, "ex-1"))
    _, keep_b = visual_token_dropout(embeds, p_drop=0.5, generator=example_generator(7, "ex-2"))
    assert torch.equal(keep_a1, keep_a2)
    assert not torch.equal(keep_a1, keep_b)


def test_dropout_rounding_and_extremes() -> None:
    embeds = torch.ones(5, 2)
    gen = example_generator(0, "x")
    # round(0.5 · 5) = round(2.5) = 2 (Python rounds halves to even) → 3 kept.
    assert int(visual_token_dropout(embeds, p_drop=0.5, generator=gen)[1].sum()) == 3
    assert int(visual_token_dropout(embeds, p_drop=0.0, generator=gen)[1].sum()) == 5
    assert int(visual_token_dropout(embeds, p_drop=1.0, generator=gen)[1].sum()) == 0
    with pytest.raises(ValueError, match="p_drop"):
        visual_token_dropout(embeds, p_drop=1.5, generator=gen)
    with pytest.raises(ValueError, match="mode"):
        visual_token_dropout(embeds, p_drop=0.5, generator=gen, mode="blur")  # type: ignore[arg-type]


def test_example_generator_seed_is_pinned() -> None:
    # int.from_bytes(sha256(b"0:ex-1").digest()[:8], "big") & (2**63 − 1), computed once and pinned: a change
    # here would silently change every stored dropped view.
    assert example_generator(0, "ex-1").initial_seed() == 3729603235309655168
    assert example_generator(1, "ex-1").initial_seed() != example_generator(0, "ex-1").initial_seed()


def test_replacement_plausible_on_the_dropped_view_or_either() -> None:
    # z = [3, 1, 2.5], z' = [3, −1, 2], β = 0.9, α = 0.1 (log α = −2.302585), the emitted token is 0.
    #   full view:    z − 3  = [0, −2, −0.5]  → all plausible;  dropped view: z' − 3 = [0, −4, −1] → tokens 0, 2
    #   contrastive 1.9 z − 0.9 z' = [5.7 − 2.7, 1.9 + 0.9, 4.75 − 1.8] = [3.0, 2.8, 2.95]
    full, dropped = torch.tensor([3.0, 1.0, 2.5]), torch.tensor([3.0, -1.0, 2.0])
    pick = {
        view: hallucinated_replacement(full, dropped, beta=0.9, alpha=0.1, exclude_token=0, view=view)
        for view in ("full", "dropped", "either")
    }
    # full / either: {1, 2} → lowest contrastive 2.8 = token 1; dropped: {2} (token 1 is implausible blind) → 2
    assert pick == {"full": 1, "dropped": 2, "either": 1}
    assert replacement_candidates(full, dropped, alpha=0.1, view="dropped").tolist() == [True, False, True]
    # Z = [2, 1, 0], Z' = [1, 1, 1] at α = 0.5: only the emitted token 0 is plausible in full view → None; blind,
    # every token is (equal logits) → contrastive [2.9, 1.0, −0.9] → token 2, in the dropped view and in either.
    args = {"beta": 0.9, "alpha": 0.5, "exclude_token": 0}
    assert hallucinated_replacement(Z[0], Z_DROP[0], **args, view="full") is None
    assert hallucinated_replacement(Z[0], Z_DROP[0], **args, view="dropped") == 2
    assert hallucinated_replacement(Z[0], Z_DROP[0], **args, view="either") == 2
    with pytest.raises(ValueError, match="plausible view"):
        replacement_candidates(Z[0], Z_DROP[0], alpha=0.1, view="blind")  # type: ignore[arg-type]
