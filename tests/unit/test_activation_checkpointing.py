"""Activation checkpointing of the response forward: same log-probs and gradients as the plain forward, and the
decoder layers really are recomputed in backward."""

from __future__ import annotations

import pytest
import torch

from hscr_platform.models.loading import ModelConfig, load_vlm
from hscr_platform.models.logprobs import encode_prefixes, separate_logps, shared_prefix_logps


@pytest.fixture(scope="module")
def setup(tiny_model_dir, noise_images):
    torch.manual_seed(0)
    model, processor = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    tok = processor.tokenizer
    prefix = encode_prefixes(processor, noise_images, ["is there a nodule?", "describe the image."])
    texts = [" yes</s>", " no</s>", " ct of the chest</s>", " mri</s>", " ct of the chest showing a nodule</s>"]
    return model.train(), tok, prefix, [tok(t)["input_ids"] for t in texts], [0, 0, 1, 1, 1]


def _decoder_layer_calls(model) -> list[int]:
    """A counter of the first text decoder layer's forward calls (the recompute calls it again)."""
    calls = [0]
    layer = model.model.language_model.layers[0]
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _grads(model, fn, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    weights = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])  # mixes responses and signs
    logps = fn(model, *args, **kwargs)[0]  # (R,)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_response_forward_matches_plain_and_separate_gradients(setup):
    model, tok, prefix, responses, owner = setup
    calls = _decoder_layer_calls(model)
    args = (prefix, responses, owner)
    plain_logps, plain = _grads(model, shared_prefix_logps, *args, pad_id=tok.pad_token_id)
    plain_calls, calls[0] = calls[0], 0
    ckpt_logps, ckpt = _grads(model, shared_prefix_logps, *args, pad_id=tok.pad_token_id,
                              activation_checkpointing=True)  # fmt: skip
    assert plain_calls == 2 and calls[0] == 3  # prefix + responses; + the responses' recompute in backward
    _, separate = _grads(model, separate_logps, *args, pad_id=tok.pad_token_id)
    torch.testing.assert_close(ckpt_logps, plain_logps, atol=1e-6, rtol=1e-6)
    assert ckpt.keys() == plain.keys() == separate.keys() and len(ckpt) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(ckpt[name], separate[name], atol=1e-4, rtol=1e-3, msg=name)
    assert not model.model.language_model.layers[0].gradient_checkpointing  # switched off again after the call


def test_checkpointing_is_off_for_a_model_in_eval_mode(setup):
    model, tok, prefix, responses, owner = setup
    calls = _decoder_layer_calls(model.eval())
    try:
        with torch.no_grad():
            shared_prefix_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id, activation_checkpointing=True)
    finally:
        model.train()
    assert calls[0] == 2  # the frozen reference: no checkpoint, no recompute
