"""The Qwen2-VL family through the platform's code: mRoPE positions, ``image_grid_thw``, images with different
visual-token counts, shared-prefix log-probs and gradients, the dropout view, decoding and one training step.

Tiny random-init Qwen2-VL and Qwen2.5-VL models are built from configs (never downloaded) and loaded through
``load_vlm``; without torchvision the loader builds inputs from the image processor + tokenizer
(``MropeProcessor``). The two test images have different sizes: 4 and 6 visual tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen import QUESTIONS, build_tiny_qwen

from hscr_platform.models.loading import ModelConfig, load_vlm, prompt_text
from hscr_platform.models.logprobs import (
    encode_prefixes,
    features_as_encoder_outputs,
    image_feature_list,
    mrope_positions,
    separate_logps,
    shared_prefix_logps,
)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def setup(request, tmp_path_factory):
    folder = build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)
    model, processor = load_vlm(ModelConfig(path=str(folder)))
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((56, 56), (56, 84))]
    tok = processor.tokenizer
    texts = ["yes<|im_end|>", "no<|im_end|>", "ct of the chest<|im_end|>", "mri<|im_end|>", "left nodule<|im_end|>"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return model, processor, images, responses, [0, 0, 1, 1, 1]


def test_mrope_positions_hand_computed():
    # one row, left-padded by 1: text, text, a 1x4x4 patch grid merged 2x2 -> 2x2 = 4 image tokens, text, text
    img = 9
    ids = torch.tensor([[0, 1, 2, img, img, img, img, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    got = mrope_positions(ids, mask, torch.tensor([[1, 4, 4]]), image_token_id=img, merge_size=2)
    assert got.tolist() == [
        [[0, 0, 1, 2, 2, 2, 2, 4, 5]],  # temporal: the image sits at 2; text resumes at 2 + max(2, 2)
        [[0, 0, 1, 2, 2, 3, 3, 4, 5]],  # height: rows 0, 0, 1, 1
        [[0, 0, 1, 2, 3, 2, 3, 4, 5]],  # width: columns 0, 1, 0, 1
    ]


def test_variable_visual_token_counts(setup):
    model, processor, images, _, _ = setup
    prefix = encode_prefixes(processor, images, QUESTIONS)
    assert prefix["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert (prefix["input_ids"] == processor.image_token_id).sum(-1).tolist() == [4, 6]
    assert [f.shape[0] for f in image_feature_list(model, prefix)] == [4, 6]


def test_mrope_positions_equal_the_models_rope_index(setup):
    model, processor, images, _, _ = setup
    prefix = encode_prefixes(processor, images, QUESTIONS)
    want, _ = model.model.get_rope_index(
        prefix["input_ids"], prefix["mm_token_type_ids"], image_grid_thw=prefix["image_grid_thw"],
        attention_mask=prefix["attention_mask"],
    )  # fmt: skip
    assert torch.equal(prefix["position_ids"], want)
    assert not torch.equal(want[0], want[1])  # 3-D positions really differ from 1-D ones here


def test_separate_forward_equals_the_models_own_mrope(setup):
    """Our explicit positions give the logits of a forward where the model computes mRoPE itself."""
    model, processor, images, responses, owner = setup
    tok = processor.tokenizer
    prefix = encode_prefixes(processor, images, QUESTIONS)
    token_logps = separate_logps(model, prefix, responses, owner, pad_id=tok.pad_token_id)[1]
    for r, (response, o) in enumerate(zip(responses, owner, strict=True)):
        text = prompt_text(processor, QUESTIONS[o]) + tok.decode(response)
        batch = processor(images=[images[o]], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits[0, -len(response) - 1 : -1]  # (T, V)
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # (T,)
        torch.testing.assert_close(token_logps[r, : len(response)], want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_logps_and_gradients_equal_separate_forwards(setup):
    model, processor, images, responses, owner = setup
    pad = processor.tokenizer.pad_token_id
    prefix = encode_prefixes(processor, images, QUESTIONS)
    weights = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    results, grads = [], []
    for fn in (shared_prefix_logps, separate_logps):
        model.zero_grad(set_to_none=True)
        logps, token_logps, _ = fn(model, prefix, responses, owner, pad_id=pad)
        (logps * weights).sum().backward()
        results.append((logps.detach(), token_logps.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("model.visual") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_dropout_view_with_different_token_counts(setup):
    from hscr_platform.generation.scoring import HscrConfig, dropped_view, two_view_logits

    model, processor, images, responses, _ = setup
    pad = processor.tokenizer.pad_token_id
    prefix = encode_prefixes(processor, images, QUESTIONS)
    feats = image_feature_list(model, prefix)
    cfg = HscrConfig(p_drop=0.5)
    dropped = dropped_view(feats, ["a", "b"], cfg=cfg)
    assert [int((d == 0).all(-1).sum()) for d in dropped] == [2, 3]  # round(0.5 · 4), round(0.5 · 6) zeroed
    base = shared_prefix_logps(model, prefix, responses[1:3], [0, 1], pad_id=pad)[1]
    same = features_as_encoder_outputs(feats)
    again = shared_prefix_logps(model, prefix, responses[1:3], [0, 1], pad_id=pad, mm_encoder_outputs=same)[1]
    torch.testing.assert_close(again, base)
    full, drop = two_view_logits(model, processor, images, QUESTIONS, responses[1:3], ids_of=["a", "b"], cfg=cfg)
    for i, response in enumerate(responses[1:3]):
        logps = torch.log_softmax(full[i, : len(response)], -1).gather(-1, torch.tensor(response)[:, None])
        torch.testing.assert_close(logps.squeeze(-1), base[i, : len(response)], atol=1e-5, rtol=1e-5)
        assert (full[i, : len(response)] - drop[i, : len(response)]).abs().max() > 1e-4


def test_decoder_equals_generate(setup):
    from hscr_platform.models.engines.decoding import ContinuationRequest
    from hscr_platform.models.engines.hf import HFDecoder

    model, processor, images, responses, _ = setup
    spec = [("a", 0, QUESTIONS[0], responses[0][:1], 6), ("b", 1, QUESTIONS[1], responses[2][:2], 5),
            ("a", 0, QUESTIONS[0], (), 7), ("b", 1, QUESTIONS[1], (), 4)]  # fmt: skip
    requests = [ContinuationRequest(example_id=e, image=images[i], question=q, forced=tuple(f), max_new_tokens=n)
                for e, i, q, f, n in spec]  # fmt: skip
    decoder = HFDecoder(model, processor)
    outs = decoder.continue_greedy(requests)
    assert decoder.stats.prefixes == 2
    for request, out in zip(requests, outs, strict=True):
        batch = processor(images=[request.image], text=[prompt_text(processor, request.question)], return_tensors="pt")
        forced = torch.tensor([list(request.forced)], dtype=torch.long)
        ids = torch.cat([batch["input_ids"], forced], dim=1)
        types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(forced, dtype=torch.int)], dim=1)
        want = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            max_new_tokens=request.max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        assert out.token_ids[: len(request.forced)] == request.forced
        assert list(out.token_ids[len(request.forced) :]) == want


def test_one_training_step_lowers_the_multilevel_loss(setup):
    from hscr.loss import all_pairs_weights, multilevel_dpo_loss

    model, processor, images, responses, owner = setup
    pad = processor.tokenizer.pad_token_id
    prefix = encode_prefixes(processor, images, QUESTIONS)
    owner_t, level = torch.tensor(owner), torch.tensor([0, 1, 0, 1, 2])
    level_mask = torch.tensor([[True, True, False], [True, True, True]])  # example 0 has 2 levels, example 1 has 3

    def loss_now(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            flat = shared_prefix_logps(model, prefix, responses, owner, pad_id=pad)[0]  # (R,)
        policy = flat.new_zeros(2, 3).index_put((owner_t, level), flat)  # (B, L)
        return multilevel_dpo_loss(policy, ref, gamma=1.0, pair_weights=all_pairs_weights(3), level_mask=level_mask)[0]

    with torch.no_grad():
        flat_ref = shared_prefix_logps(model, prefix, responses, owner, pad_id=pad)[0]  # (R,)
    ref = flat_ref.new_zeros(2, 3).index_put((owner_t, level), flat_ref)  # (B, L)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    try:
        loss = loss_now(True).mean()
        # policy = reference: every pair costs log 2; example 0 has 1 pair, example 1 has 3 -> mean 2 log 2
        torch.testing.assert_close(loss, torch.tensor(2 * np.log(2), dtype=loss.dtype))
        loss.backward()
        optimizer.step()
        after = loss_now(False).mean()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # restored for the other tests of the module
            for n, p in model.named_parameters():
                p.copy_(before[n])
    assert after < loss - 1e-4
    assert any(n.startswith("model.visual") for n in changed) and "lm_head.weight" in changed


def test_loader_builds_qwen_inputs_without_torchvision(setup):
    from hscr_platform.models.mrope_processor import MropeProcessor

    model, processor, _, _, _ = setup
    assert isinstance(processor, MropeProcessor)
    assert type(model).__name__ in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def test_scoring_and_evaluation_paths_run_on_qwen(setup):
    """score_batch (what generation runs) gives y_w's reference log-probs; generate_answers (evaluation, batched
    and left-padded) gives the same answers as the shared-prefix decoder."""
    from hscr_platform.generation.scoring import HscrConfig, excluded_token_ids, score_batch
    from hscr_platform.models.engines.decoding import ContinuationRequest
    from hscr_platform.models.engines.hf import HFDecoder
    from hscr_platform.models.loading import generate_answers

    model, processor, images, responses, _ = setup
    pad, tok = processor.tokenizer.pad_token_id, processor.tokenizer
    prefix = encode_prefixes(processor, images, QUESTIONS)
    ys = [responses[0], responses[2]]
    want = shared_prefix_logps(model, prefix, ys, [0, 1], pad_id=pad)[1]
    cfg = HscrConfig(n_coupled=2, levels=2)
    scored = score_batch(model, processor, images, QUESTIONS, ys, ids_of=["a", "b"], cfg=cfg,
                         excluded=excluded_token_ids(tok))  # fmt: skip
    for i, (result, logps) in enumerate(scored):
        torch.testing.assert_close(torch.tensor(logps), want[i, : len(ys[i])], atol=1e-5, rtol=1e-5)
        assert len(result.shift) == len(ys[i])
    answers = generate_answers(model, processor, images, QUESTIONS, max_new_tokens=5)
    requests = [ContinuationRequest(example_id=q, image=im, question=q, forced=(), max_new_tokens=5)
                for im, q in zip(images, QUESTIONS, strict=True)]  # fmt: skip
    decoded = HFDecoder(model, processor).continue_greedy(requests)
    assert answers == [tok.decode(list(d.token_ids), skip_special_tokens=True).strip() for d in decoded]
    assert all(answers), answers  # something was decoded
