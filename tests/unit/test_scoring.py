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
    score_example,
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
