"""The transformers decoder: forced tokens respected, greedy equals ``model.generate``, prefix reuse changes
nothing but the work done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hscr_platform.models.engines.decoding import ContinuationRequest
from hscr_platform.models.engines.hf import HFDecoder, group_requests
from hscr_platform.models.loading import ModelConfig, load_vlm, prompt_text


@pytest.fixture(scope="module")
def setup(tiny_model_dir, noise_images):
    torch.manual_seed(0)
    model, processor = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    return model, processor, noise_images


def _requests(processor, images) -> list[ContinuationRequest]:
    tok = processor.tokenizer
    yes, nodule = tok(" yes a nodule")["input_ids"], tok(" ct of the chest")["input_ids"]
    spec = [  # (example, image, question, forced, max_new_tokens): levels of two examples, mixed lengths
        ("a", 0, "is there a nodule?", yes[:1], 6),
        ("a", 0, "is there a nodule?", yes, 4),
        ("b", 1, "describe the image.", nodule[:2], 7),
        ("a", 0, "is there a nodule?", (), 5),
        ("b", 1, "describe the image.", nodule, 0),
    ]
    return [
        ContinuationRequest(example_id=e, image=images[i], question=q, forced=tuple(f), max_new_tokens=n)
        for e, i, q, f, n in spec
    ]


def _generate(model, processor, request) -> list[int]:
    """model.generate's greedy tokens after prompt + forced tokens, one request at a time (no padding)."""
    batch = processor(images=[request.image], text=[prompt_text(processor, request.question)], return_tensors="pt")
    forced = torch.tensor([list(request.forced)], dtype=torch.long)
    ids = torch.cat([batch["input_ids"], forced], dim=1)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=batch["pixel_values"],
        max_new_tokens=request.max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_forced_tokens_come_first_and_budgets_hold(setup):
    model, processor, images = setup
    requests = _requests(processor, images)
    outs = HFDecoder(model, processor).continue_greedy(requests)
    for request, out in zip(requests, outs, strict=True):
        assert out.token_ids[: len(request.forced)] == request.forced
        new = out.token_ids[len(request.forced) :]
        assert len(new) == len(out.logprobs) <= request.max_new_tokens
        assert all(lp <= 0 for lp in out.logprobs)
    assert outs[4].token_ids == requests[4].forced  # max_new_tokens = 0: nothing decoded


def test_greedy_continuation_equals_model_generate(setup):
    model, processor, images = setup
    requests = [r for r in _requests(processor, images) if r.max_new_tokens > 0]
    outs = HFDecoder(model, processor).continue_greedy(requests)
    for request, out in zip(requests, outs, strict=True):
        expected = _generate(model, processor, request)
        assert list(out.token_ids[len(request.forced) :]) == expected


def test_prefix_reuse_equals_no_reuse_with_less_work(setup):
    model, processor, images = setup
    requests = _requests(processor, images)
    shared, naive = HFDecoder(model, processor), HFDecoder(model, processor, reuse_prefix=False)
    a, b = shared.continue_greedy(requests), naive.continue_greedy(requests)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    np.testing.assert_allclose([lp for o in a for lp in o.logprobs], [lp for o in b for lp in o.logprobs], atol=1e-5)
    assert shared.stats.prefixes == 2 and naive.stats.prefixes == 5
    assert shared.stats.forward_tokens < naive.stats.forward_tokens


def test_group_requests_shares_prefixes_by_example(setup):
    _, processor, images = setup
    requests = _requests(processor, images)
    assert group_requests(requests, reuse_prefix=True) == ([0, 2], [0, 0, 1, 0, 1])
    assert group_requests(requests, reuse_prefix=False) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])


def test_stops_at_eos(setup):
    model, processor, images = setup
    eos = processor.tokenizer.eos_token_id
    request = ContinuationRequest(example_id="a", image=images[0], question="q?", forced=(5, eos), max_new_tokens=9)
    assert HFDecoder(model, processor).continue_greedy([request])[0].token_ids == (5, eos)


def test_scored_continuations_carry_the_reference_logprobs(setup):
    from hscr_platform.models.logprobs import encode_prefixes, shared_prefix_logps

    model, processor, images = setup
    requests = [r for r in _requests(processor, images) if r.forced or r.max_new_tokens]
    outs = HFDecoder(model, processor).continue_greedy_scored(requests)
    responses = [list(c.token_ids) for c, _ in outs]
    prefix = encode_prefixes(processor, [r.image for r in requests], [r.question for r in requests])
    pad = processor.tokenizer.pad_token_id
    _, token_logps, _ = shared_prefix_logps(model, prefix, responses, list(range(len(requests))), pad_id=pad)
    for i, (continuation, forced) in enumerate(outs):
        assert len(forced) == len(requests[i].forced)
        mine = torch.tensor([*forced, *continuation.logprobs])
        torch.testing.assert_close(mine, token_logps[i, : len(responses[i])], atol=1e-4, rtol=1e-4)
