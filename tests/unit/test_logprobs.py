"""The shared-prefix forward equals one full forward per response: log-probs and parameter gradients."""

from __future__ import annotations

import pytest
import torch

from hscr_platform.models.loading import ModelConfig, load_vlm
from hscr_platform.models.logprobs import (
    drop_features,
    encode_prefixes,
    features_as_encoder_outputs,
    image_features,
    model_fingerprint,
    pad_responses,
    separate_logps,
    shared_prefix_logps,
)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, noise_images):
    torch.manual_seed(0)
    model, processor = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    images = noise_images
    # questions of different lengths -> left padding is exercised
    prefix = encode_prefixes(processor, images, ["is there a nodule?", "describe the image."])
    tok = processor.tokenizer
    texts = [" yes</s>", " no</s>", " ct of the chest</s>", " mri</s>", " ct of the chest showing a nodule</s>"]
    responses = [tok(t)["input_ids"] for t in texts]
    return model, tok, prefix, responses, [0, 0, 1, 1, 1]


def test_prefixes_are_left_padded(setup):
    _, _, prefix, _, _ = setup
    mask = prefix["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # both end at the last column; one is padded on the left


def test_shared_prefix_logps_equal_separate_forwards(setup):
    model, tok, prefix, responses, owner = setup
    shared, shared_tok, mask = shared_prefix_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id)
    naive, naive_tok, _ = separate_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id)
    assert shared.shape == (5,) and mask.sum(-1).tolist() == [len(r) for r in responses]
    torch.testing.assert_close(shared, naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared_tok, naive_tok, atol=1e-5, rtol=1e-5)
    assert (shared < 0).all()


def test_shared_prefix_gradients_equal_separate_forwards(setup):
    model, tok, prefix, responses, owner = setup
    grads = []
    for fn in (shared_prefix_logps, separate_logps):
        model.zero_grad(set_to_none=True)
        weights = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])  # a loss that mixes responses and signs
        (fn(model, prefix, responses, owner, pad_id=tok.pad_token_id)[0] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_injected_features_reproduce_pixels_and_dropout_changes_them(setup):
    model, tok, prefix, responses, owner = setup
    base = shared_prefix_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id)[0]
    feats = image_features(model, prefix["pixel_values"])  # (B, N, D)
    assert feats.shape[:2] == (2, 64)
    same = features_as_encoder_outputs(feats)
    torch.testing.assert_close(
        shared_prefix_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id, mm_encoder_outputs=same)[0],
        base,
    )
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[:, ::2] = False
    dropped = drop_features(feats, keep)
    assert (dropped[:, ::2] == 0).all() and torch.equal(dropped[:, 1::2], feats[:, 1::2])
    moved = shared_prefix_logps(
        model, prefix, responses, owner, pad_id=tok.pad_token_id,
        mm_encoder_outputs=features_as_encoder_outputs(dropped),
    )[0]  # fmt: skip
    assert (moved - base).abs().max() > 1e-4


def test_pad_responses():
    ids, mask = pad_responses([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_fingerprint_includes_dtype_and_attention_implementation(tiny_model_dir):
    # Stored fp32 reference log-probs must not match a bf16 (or another attention kernel's) reference.
    base = model_fingerprint(tiny_model_dir)
    assert base == model_fingerprint(tiny_model_dir, dtype="float32", attn_implementation="default")
    bf16 = model_fingerprint(tiny_model_dir, dtype="bfloat16")
    eager = model_fingerprint(tiny_model_dir, attn_implementation="eager")
    assert len({base, bf16, eager, model_fingerprint(tiny_model_dir, dtype="float16")}) == 4
    assert bf16 == model_fingerprint(tiny_model_dir, dtype="bfloat16") and len(bf16) == 16
