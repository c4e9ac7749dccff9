"""The vLLM decoder on tiny random-init Qwen2-VL / Qwen2.5-VL models: the same greedy tokens as the
transformers decoder (mRoPE positions, two images with 4 and 6 visual tokens, forced prefixes).

Runs only where vllm imports (``.venv-vllm``: ``.venv-vllm/bin/python -m pytest tests/vllm -q -m vllm``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hscr_platform.models.engines.decoding import ContinuationRequest

_SPEC = importlib.util.find_spec("vllm")
VLLM_MISSING = _SPEC is None or _SPEC.origin is None  # only the installed package has an __init__.py
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(VLLM_MISSING, reason="vllm is not installed: the vLLM tier runs in .venv-vllm"),
]
LOGPROB_TOL = 1e-2  # vLLM vs transformers (different kernels), as in test_vllm_parity.py


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def engines(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
    from tiny_qwen import build_tiny_qwen

    from hscr_platform.models.engines.vllm import VllmConfig, VllmDecoder
    from hscr_platform.models.loading import ModelConfig, load_vlm

    folder = build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)
    model, processor = load_vlm(ModelConfig(path=str(folder)))
    cfg = VllmConfig(dtype="float32", max_model_len=128, block_size=32, kv_cache_memory_bytes=64 << 20,
                     max_num_seqs=8, converted_dir=str(tmp_path_factory.mktemp("vllm") / "model"))  # fmt: skip
    decoder = VllmDecoder(folder, cfg)
    yield model, processor, decoder
    decoder.close()


def test_vllm_equals_the_transformers_decoder_on_qwen(engines):
    from tiny_qwen import QUESTIONS

    from hscr_platform.models.engines.hf import HFDecoder

    model, processor, decoder = engines
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((56, 56), (56, 84))]
    forced = processor.tokenizer("ct of the chest", add_special_tokens=False)["input_ids"]
    spec = [(0, (), 6), (1, (), 6), (0, forced[:2], 5), (1, forced[:3], 4)]
    requests = [
        ContinuationRequest(
            example_id=str(i), image=images[i], question=QUESTIONS[i], forced=tuple(f), max_new_tokens=n
        )
        for i, f, n in spec
    ]
    want = HFDecoder(model, processor).continue_greedy(requests)
    got = decoder.continue_greedy(requests)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, f"request {i}: vLLM {g.token_ids} != transformers {w.token_ids}"
        worst = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True))
        assert worst <= LOGPROB_TOL, f"request {i}: log-probs differ by {worst:.2e}"
        assert len(g.logprobs) > 0


def test_the_torchvision_free_inputs_equal_transformers_processor(tmp_path):
    """Where torchvision imports (this tier), transformers' Qwen2VLProcessor loads: the MropeProcessor that the
    CPU suite uses instead builds the same ids, positions, grids and (to float rounding) pixels."""
    import torch
    from tiny_qwen import QUESTIONS, build_tiny_qwen

    from hscr_platform.models.engines.vllm import ensure_torchvision_importable
    from hscr_platform.models.loading import load_processor, prompt_text
    from hscr_platform.models.logprobs import encode_prefixes
    from hscr_platform.models.mrope_processor import MropeProcessor

    ensure_torchvision_importable()
    folder = build_tiny_qwen(tmp_path / "qwen", "qwen2_vl")
    real, ours = load_processor(folder), MropeProcessor.from_folder(folder)
    assert type(real).__name__ == "Qwen2VLProcessor"
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((56, 56), (56, 84))]
    want, got = encode_prefixes(real, images, QUESTIONS), encode_prefixes(ours, images, QUESTIONS)
    assert sorted(want) == sorted(got)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "position_ids"):
        assert torch.equal(want[key], got[key]), key
    torch.testing.assert_close(want["pixel_values"], got["pixel_values"], atol=1e-5, rtol=0)
    assert prompt_text(real, QUESTIONS[0]) == prompt_text(ours, QUESTIONS[0])
