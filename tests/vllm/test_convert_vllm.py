"""A converted original-layout LLaVA-Med-style checkpoint (Mistral LM) runs in vLLM: greedy tokens equal
transformers' ``generate`` on the same folder.

Runs only where vllm imports (``.venv-vllm``: ``.venv-vllm/bin/python -m pytest tests/vllm -q -m vllm``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hscr_platform.models.engines.decoding import ContinuationRequest

_SPEC = importlib.util.find_spec("vllm")
VLLM_MISSING = _SPEC is None or _SPEC.origin is None  # only the installed package has an __init__.py
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(VLLM_MISSING, reason="vllm is not installed: the vLLM tier runs in .venv-vllm"),
]
LOGPROB_TOL = 1e-2  # vLLM vs transformers (different kernels), as in test_vllm_parity.py


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from original_llava import write_original_llava

    from jobs.convert import main

    root = tmp_path_factory.mktemp("convert")
    original = write_original_llava(root / "src", family="mistral", tower_in_checkpoint=True)
    main(["--config", "jobs/configs/convert/tiny.yaml", f"source.path={original.folder}", f"output.path={root / 'hf'}"])
    return root / "hf"


@pytest.fixture(scope="module")
def decoder(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from hscr_platform.models.engines.vllm import VllmConfig, VllmDecoder

    cfg = VllmConfig(dtype="float32", max_model_len=128, block_size=32, kv_cache_memory_bytes=64 << 20,
                     max_num_seqs=8, converted_dir=str(tmp_path_factory.mktemp("vllm") / "model"))  # fmt: skip
    engine = VllmDecoder(converted, cfg)
    yield engine
    engine.close()


def test_vllm_greedy_tokens_equal_transformers_on_the_converted_model(converted, decoder, images):
    import torch

    from hscr_platform.models.loading import ModelConfig, load_vlm, prompt_text

    model, processor = load_vlm(ModelConfig(path=str(converted)))
    tok = processor.tokenizer
    spec = [("a", 0, "is there a nodule?", (), 8), ("b", 1, "describe the image.", tok(" ct of")["input_ids"][1:], 6),
            ("a", 0, "is there a nodule?", tok(" yes")["input_ids"][1:], 5)]  # fmt: skip
    requests = [ContinuationRequest(example_id=e, image=images[i], question=q, forced=tuple(f), max_new_tokens=n)
                for e, i, q, f, n in spec]  # fmt: skip
    got = decoder.continue_greedy(requests)
    for request, out in zip(requests, got, strict=True):
        batch = processor(images=[request.image], text=[prompt_text(processor, request.question)], return_tensors="pt")
        ids = torch.cat([batch["input_ids"], torch.tensor([list(request.forced)], dtype=torch.long)], dim=1)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                max_new_tokens=request.max_new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        new = gen.sequences[0, ids.shape[1] :].tolist()
        steps = torch.log_softmax(torch.cat(gen.logits).float(), dim=-1)  # (new, V)
        assert out.token_ids == (*request.forced, *new), f"{request}: vLLM {out.token_ids} != transformers {new}"
        worst = max(abs(a - float(steps[i, t])) for i, (a, t) in enumerate(zip(out.logprobs, new, strict=True)))
        assert worst <= LOGPROB_TOL
        assert len(new) > 0
