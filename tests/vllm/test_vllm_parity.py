"""The vLLM decoder against transformers on the toy model: same greedy tokens, log-probs within 1e-2, and
prefix caching (levels of one example share the image + prompt blocks) changes the work, not the results.

Runs only where vllm imports (``.venv-vllm``: ``.venv-vllm/bin/python -m pytest tests/vllm -q -m vllm``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import pytest

from hscr_platform.models.engines.decoding import Continuation, ContinuationRequest

SKIP_REASON = (
    "vllm is not installed in this environment: the vLLM tier runs in .venv-vllm "
    "(bash scripts/setup_vllm_cpu.sh, then .venv-vllm/bin/python -m pytest tests/vllm -q -m vllm)"
)
_SPEC = importlib.util.find_spec("vllm")  # pytest puts tests/ on sys.path: this folder is a namespace "vllm"
VLLM_MISSING = _SPEC is None or _SPEC.origin is None  # only the installed package has an __init__.py
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(VLLM_MISSING, reason=SKIP_REASON)]

LOGPROB_TOL = 1e-2  # vLLM vs transformers (different kernels)
SAME_ENGINE_TOL = 1e-4  # one engine, different batching / cache state


def _requests(processor, images) -> list[ContinuationRequest]:
    """Levels of two examples (different images and questions), forced prefixes of 0-6 tokens, interleaved."""
    tok = processor.tokenizer
    finding = tok(" ct of the chest showing a nodule")["input_ids"]
    answer = tok(" yes, a nodule on the left")["input_ids"]
    eos = tok.eos_token_id
    spec = [  # (example, image, question, forced, max_new_tokens)
        ("a", 0, "is there a nodule?", (), 8),
        ("a", 0, "is there a nodule?", answer[:1], 8),
        ("b", 1, "describe the image.", finding[:3], 6),
        ("a", 0, "is there a nodule?", answer[:4], 5),
        ("b", 1, "describe the image.", (), 7),
        ("b", 1, "describe the image.", finding[:6], 8),
        ("a", 0, "is there a nodule?", (*answer[:2], eos), 8),  # forced end of sequence: nothing to decode
        ("b", 1, "describe the image.", finding[:2], 0),  # no budget: forced tokens only
    ]
    return [
        ContinuationRequest(example_id=e, image=images[i], question=q, forced=tuple(f), max_new_tokens=n)
        for e, i, q, f, n in spec
    ]


def _generate(model, processor, request: ContinuationRequest) -> Continuation:
    """``model.generate`` (greedy) after prompt + forced tokens, with the log-prob of each new token."""
    import torch

    from hscr_platform.models.loading import prompt_text

    if request.max_new_tokens == 0 or request.forced[-1:] == (processor.tokenizer.eos_token_id,):
        return Continuation(token_ids=request.forced, logprobs=())
    prompt = prompt_text(processor, request.question)
    batch = processor(images=[request.image], text=[prompt], return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor([list(request.forced)], dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
            max_new_tokens=request.max_new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
    new = out.sequences[0, ids.shape[1] :].tolist()
    steps = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # (new, V)
    logps = [float(steps[i, t]) for i, t in enumerate(new)]
    return Continuation(token_ids=(*request.forced, *new), logprobs=tuple(logps))


def _assert_same(got: Sequence[Continuation], want: Sequence[Continuation], *, tol: float) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, f"request {i}: tokens {g.token_ids} != {w.token_ids}"
        assert len(g.logprobs) == len(w.logprobs), f"request {i}"
        worst = max((abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True)), default=0.0)
        assert worst <= tol, f"request {i}: log-probs differ by {worst:.2e} ({g.logprobs} vs {w.logprobs})"


def test_greedy_tokens_and_logprobs_match_transformers_generate(vllm_decoder, hf_model, images):
    model, processor = hf_model
    requests = _requests(processor, images)
    got = vllm_decoder.continue_greedy(requests)
    _assert_same(got, [_generate(model, processor, r) for r in requests], tol=LOGPROB_TOL)
    for request, out in zip(requests, got, strict=True):
        assert out.token_ids[: len(request.forced)] == request.forced
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in out.logprobs)
    assert any(len(out.logprobs) > 0 for out in got)


def test_matches_the_transformers_decoder(vllm_decoder, hf_model, images):
    from hscr_platform.models.engines.hf import HFDecoder

    model, processor = hf_model
    requests = _requests(processor, images)
    want = HFDecoder(model, processor).continue_greedy(requests)
    _assert_same(vllm_decoder.continue_greedy(requests), want, tol=LOGPROB_TOL)


def test_prefix_caching_changes_the_work_not_the_results(vllm_decoder, hf_model, images):
    _, processor = hf_model
    requests = [r for r in _requests(processor, images) if r.max_new_tokens > 0][:6]
    stats = vllm_decoder.stats
    cold = []
    for request in requests:  # every request alone on an empty cache: nothing shared
        assert vllm_decoder.llm.reset_prefix_cache()
        before = stats.cached_tokens
        cold.extend(vllm_decoder.continue_greedy([request]))
        assert stats.cached_tokens == before
    assert vllm_decoder.llm.reset_prefix_cache()
    before = stats.cached_tokens
    together = vllm_decoder.continue_greedy(requests)
    assert stats.cached_tokens - before >= 64 * 4, "the 4 later levels of 2 examples reuse the image blocks"
    before = stats.cached_tokens
    separately = [vllm_decoder.continue_greedy([request])[0] for request in reversed(requests)][::-1]
    assert stats.cached_tokens - before >= 64 * len(requests), "every level hits the warm cache"
    _assert_same(together, cold, tol=SAME_ENGINE_TOL)
    _assert_same(separately, cold, tol=SAME_ENGINE_TOL)
