"""Two-view scoring: y_w tokenization, one-forward logits equal the reference paths, rewards wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hscr_platform.generation.scoring import (
    ExcludedTokens,
    HscrConfig,
    dropped_view,
    excluded_token_ids,
    forced_prefix,
    model_token_limit,
    response_token_ids,
    score_batch,
    score_example,
    token_pieces,
    two_view_logits,
)
from hscr_platform.models.loading import ModelConfig, load_vlm
from hscr_platform.models.logprobs import (
    encode_prefixes,
    features_as_encoder_outputs,
    image_features,
    shared_prefix_logps,
)

QUESTIONS = ["is there a nodule?", "describe the image."]
ANSWERS = ["yes", "ct of the chest showing a nodule on the left."]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, processor = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).convert("RGB") for _ in range(2)]
    eos = {processor.tokenizer.eos_token_id}
    responses = [response_token_ids(processor, q, a, eos_ids=eos) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    return model, processor, images, responses


def test_response_tokens_are_the_answer_plus_eos(setup):
    _, processor, _, responses = setup
    tok = processor.tokenizer
    for answer, ids in zip(ANSWERS, responses, strict=True):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert tok.decode(ids, skip_special_tokens=True).strip() == answer


def test_full_view_logits_match_shared_prefix_logps(setup):
    model, processor, images, responses = setup
    full, _ = two_view_logits(model, processor, images, QUESTIONS, responses, ids_of=["a", "b"], cfg=HscrConfig())
    prefix = encode_prefixes(processor, images, QUESTIONS)
    _, token_logps, _ = shared_prefix_logps(model, prefix, responses, [0, 1], pad_id=processor.tokenizer.pad_token_id)
    for i, ids in enumerate(responses):
        mine = torch.log_softmax(full[i, : len(ids)], -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(mine, token_logps[i, : len(ids)], atol=1e-5, rtol=1e-5)


def test_dropped_view_matches_injected_dropout_features(setup):
    model, processor, images, responses = setup
    cfg = HscrConfig(p_drop=0.5, seed=3)
    _, dropped = two_view_logits(model, processor, images, QUESTIONS, responses, ids_of=["a", "b"], cfg=cfg)
    prefix = encode_prefixes(processor, images, QUESTIONS)
    feats = dropped_view(image_features(model, prefix["pixel_values"]), ["a", "b"], cfg=cfg)  # (2, N, D)
    assert ((feats == 0).all(-1).sum(-1) == round(0.5 * feats.shape[1])).all()
    _, token_logps, _ = shared_prefix_logps(
        model,
        prefix,
        responses,
        [0, 1],
        pad_id=processor.tokenizer.pad_token_id,
        mm_encoder_outputs=features_as_encoder_outputs(feats),
    )
    ids = responses[1]
    mine = torch.log_softmax(dropped[1, : len(ids)], -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(mine, token_logps[1, : len(ids)], atol=1e-5, rtol=1e-5)


def test_scoring_is_batch_invariant_and_seeded_per_example(setup):
    model, processor, images, responses = setup
    cfg = HscrConfig()
    both = two_view_logits(model, processor, images, QUESTIONS, responses, ids_of=["a", "b"], cfg=cfg)
    alone = two_view_logits(model, processor, images[1:], QUESTIONS[1:], responses[1:], ids_of=["b"], cfg=cfg)
    width = len(responses[1])
    for view_both, view_alone in zip(both, alone, strict=True):
        torch.testing.assert_close(view_both[1, :width], view_alone[0, :width], atol=1e-4, rtol=1e-4)
    other = two_view_logits(model, processor, images[1:], QUESTIONS[1:], responses[1:], ids_of=["c"], cfg=cfg)
    assert torch.equal(other[0], alone[0]) and not torch.equal(other[1], alone[1])  # only the mask moved


def test_score_example_hand_built_logits():
    # V = 6: 0 = eos (special), 1 = "." (punctuation), 2..5 words. y_w = [2, 3, 1, 4, 0].
    full = torch.full((5, 6), -5.0)
    dropped = torch.full((5, 6), -5.0)
    response = [2, 3, 1, 4, 0]
    for t, token in enumerate(response):
        full[t, token] = 2.0
    shifts = [1.0, 3.0, 5.0, 2.0, 9.0]  # position 2 is punctuation, 4 is eos: never coupled
    for t, token in enumerate(response):
        dropped[t, token] = 2.0 - shifts[t]
    full[0, 5], dropped[0, 5] = 1.5, 3.0  # at t=0, token 5 is plausible and favoured by the dropped view
    full[1, 0] = 1.9  # at t=1, only eos competes: special, never a replacement -> position 1 has none
    full[3, [2, 5]] = 1.8
    dropped[3, 2], dropped[3, 5] = 1.0, 2.5  # at t=3: 5 has the lower contrastive logit than 2
    excluded = ExcludedTokens(special=frozenset({0}), punctuation=frozenset({1}))
    scored = score_example(full, dropped, response, cfg=HscrConfig(n_coupled=10, levels=10), excluded=excluded)
    assert scored.coupled == [1, 3, 0]  # eligible positions by shift, descending
    assert scored.replacements == {3: 5, 0: 5}
    assert scored.levels == [(3,), (0, 3)]
    assert forced_prefix(response, scored, 0) == [2, 3, 1, 5]
    assert forced_prefix(response, scored, 1) == [5, 3, 1, 5]
    assert scored.shift == pytest.approx(shifts)
    assert all(0.0 <= r <= 1.0 for r in scored.reward) and not math.isnan(sum(scored.reward))


def test_excluded_tokens_and_limit(setup):
    model, processor, _, _ = setup
    excluded = excluded_token_ids(processor.tokenizer)
    tok = processor.tokenizer
    assert tok.eos_token_id in excluded.special and tok.convert_tokens_to_ids("<image>") in excluded.special
    assert tok.convert_tokens_to_ids(".") in excluded.punctuation
    word = tok(" nodule", add_special_tokens=False)["input_ids"][-1]
    assert word not in excluded.punctuation | excluded.special
    assert model_token_limit(model.config) == 160 and model_token_limit(model.config, 99) == 99


def _one_hot_logits(response: list[int], vocab: int, shifts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, V) logits: the emitted token at 2.0, others at −5.0; the dropped view lowers it by ``shifts[t]``."""
    full = torch.full((len(response), vocab), -5.0)
    for t, token in enumerate(response):
        full[t, token] = 2.0
    dropped = full.clone()
    for t, token in enumerate(response):
        dropped[t, token] -= shifts[t]
    return full, dropped


def test_eos_as_argmax_still_sets_the_plausibility_threshold():
    # V = 6, 0 = eos. y_w = [2, 3, 0], shifts [3, 1, 9]: coupled positions 0 then 1 (eos is never coupled).
    response = [2, 3, 0]
    full, dropped = _one_hot_logits(response, 6, [3.0, 1.0, 9.0])
    # t = 0: eos is the argmax (5.0); token 5 at 0.0 has p = e^−5 = 0.0067 · p_max < α = 0.1 → implausible, and
    # y_w's own token (2 − 5 = −3 < log 0.1 = −2.30) too: no replacement. Masking eos first would make 2.0 the
    # max and let token 5 pass (0 − 2 = −2 ≥ −2.30).
    full[0, 0], full[0, 5] = 5.0, 0.0
    # t = 1: token 4 at 1.0 is plausible (1 − 2 = −1 ≥ −2.30) and the only candidate → replacement 4.
    full[1, 4] = 1.0
    excluded = ExcludedTokens(special=frozenset({0}), punctuation=frozenset({1}))
    scored = score_example(full, dropped, response, cfg=HscrConfig(alpha=0.1), excluded=excluded)
    assert scored.coupled == [0, 1]
    assert scored.replacements == {1: 4}
    assert scored.levels == [(1,)]


def test_shift_kind_and_function_words_decide_coupling():
    # V = 6 with pieces: y_w = " the cyst left</s>" = [2, 3, 4, 0].
    pieces = ("</s>", ".", " the", " cyst", " left", " right")
    excluded = ExcludedTokens(special=frozenset({0}), punctuation=frozenset({1}), pieces=pieces)
    response = [2, 3, 4, 0]
    full, dropped = _one_hot_logits(response, 6, [0.0, 1.0, 0.5, 0.0])
    dropped[0] = full[0] - 3.0  # " the": every logit 3 lower without the image → logit shift 3, log-prob shift 0
    logit = score_example(full, dropped, response, cfg=HscrConfig(), excluded=excluded)
    assert logit.coupled == [0, 1, 2] and logit.shift == pytest.approx([3.0, 1.0, 0.5, 0.0])
    # Log-prob shifts: t=0 exactly 0; t=1: (2 − log(e² + 5e^−5)) − (1 − log(e + 5e^−5)) = 0.007769;
    # t=2: (2 − log(e² + 5e^−5)) − (1.5 − log(e^1.5 + 5e^−5)) = 0.002940.
    logprob = score_example(full, dropped, response, cfg=HscrConfig(shift="logprob"), excluded=excluded)
    assert logprob.coupled == [1, 2, 0]
    assert logprob.shift[:3] == pytest.approx([0.0, 0.007769, 0.002940], abs=1e-6)
    no_function = score_example(full, dropped, response, cfg=HscrConfig(exclude_function_words=True), excluded=excluded)
    assert no_function.coupled == [1, 2]
    with pytest.raises(ValueError, match="pieces"):
        score_example(full, dropped, response, cfg=HscrConfig(exclude_function_words=True),
                      excluded=ExcludedTokens(special=frozenset({0}), punctuation=frozenset({1})))  # fmt: skip


def test_plausible_view_decides_which_positions_can_be_replaced():
    # V = 6, eos 0. y_w = [2, 3, 0], shifts [3, 1, 9] → coupled [0, 1]. With the image every alternative sits at
    # −5 (e^−7 · p_max < α = 0.1): nothing is plausible but y_w's own tokens. Without the image (dropped view),
    # y_w's token at t = 0 falls to −1 and token 5 rises to 0: token 5 is the blind view's argmax there.
    response = [2, 3, 0]
    full, dropped = _one_hot_logits(response, 6, [3.0, 1.0, 9.0])
    dropped[0, 5] = 0.0
    excluded = ExcludedTokens(special=frozenset({0}), punctuation=frozenset({1}))
    full_only = score_example(full, dropped, response, cfg=HscrConfig(), excluded=excluded)
    assert full_only.coupled == [0, 1] and full_only.replacements == {} and full_only.levels == []
    # dropped / either: at t = 0 token 5 (0 − 0 ≥ log 0.1) is plausible blind → the replacement; at t = 1 the
    # blind view keeps y_w's token 3 at 1.0 and the rest at −5: still nothing.
    for view in ("dropped", "either"):
        scored = score_example(full, dropped, response, cfg=HscrConfig(plausible_view=view), excluded=excluded)
        assert scored.replacements == {0: 5} and scored.levels == [(0,)], view


def test_defaults_keep_todays_shift_and_drop_near_copies():
    cfg = HscrConfig()
    assert cfg.shift == "logit" and not cfg.exclude_function_words and cfg.max_similarity == 0.999
    assert cfg.plausible_view == "full"  # METHOD's (VCD's) rule stays the default of the method config


def test_token_pieces_mark_word_starts(setup):
    _, processor, _, _ = setup
    tok = processor.tokenizer
    pieces = token_pieces(tok)
    ids = tok(" the nodule", add_special_tokens=False)["input_ids"]
    assert pieces[ids[0]] == " the" and all(len(p) > 0 for p in (pieces[i] for i in ids))


def test_score_batch_equals_the_full_logits_path_one_example_of_logits_at_a_time(setup):
    model, processor, images, responses = setup
    excluded = excluded_token_ids(processor.tokenizer)
    cfg = HscrConfig(alpha=0.05, seed=2)
    full, dropped = two_view_logits(model, processor, images, QUESTIONS, responses, ids_of=["a", "b"], cfg=cfg)
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    try:
        batched = score_batch(
            model, processor, images, QUESTIONS, responses, ids_of=["a", "b"], cfg=cfg, excluded=excluded
        )
    finally:
        hook.remove()
    assert rows == [2, 2]  # the LM head ran per example on its 2 views: never (2B, T, V) logits at once
    for i, ids in enumerate(responses):
        expected = score_example(full[i], dropped[i], ids, cfg=cfg, excluded=excluded)
        scored, logps = batched[i]
        assert scored.coupled == expected.coupled and scored.levels == expected.levels
        assert scored.replacements == expected.replacements and len(expected.replacements) > 0
        assert scored.shift == pytest.approx(expected.shift, abs=1e-6)  # equal to the bit on this CPU
        assert scored.reward == pytest.approx(expected.reward, abs=1e-6)
        want = torch.log_softmax(full[i, : len(ids)], -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert logps == pytest.approx(want.tolist(), abs=1e-6)
