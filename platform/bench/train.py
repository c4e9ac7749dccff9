"""Training-forward benchmark (``python -m jobs.benchmark train``): shared-prefix vs per-response forward.

For each model (the toy Med-VLM, and a 50–100M-parameter model of the same architecture scaled up) one
multi-level DPO forward + backward over B examples with 1 + k responses is timed two ways:

    shared     image + prompt encoded once per example, the 1 + k responses read its KV cache (this project)
    baseline   one full image + prompt + response sequence per response, batched (TRL-style concatenation)

Reported: examples/s of each and their ratio, model FLOPs utilisation (FLOPs counted by torch's
FlopCounterMode for one step, over the matmul peak of this machine measured in the same run), peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hscr.loss import all_pairs_weights, multilevel_dpo_loss
from hscr_platform.models.toy import ToyModelConfig


def _large_model() -> ToyModelConfig:
    return ToyModelConfig(
        vocab_size=512,
        image_size=64,
        patch_size=8,
        vision_hidden=256,
        vision_layers=4,
        vision_heads=4,
        text_hidden=768,
        text_layers=8,
        text_heads=12,
        text_intermediate=2048,
        max_positions=256,
    )


@dataclass(frozen=True, kw_only=True)
class TrainBenchConfig:
    """Sizes of the training benchmark (defaults: a few minutes on 2 CPU cores)."""

    examples: int = 4  # B examples per step
    levels: int = 4  # 1 + k responses per example (k = 3)
    threads: int = 2
    toy_iters: int = 10
    large_iters: int = 2
    warmup: int = 1
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)  # the demo's base-model architecture
    large: ToyModelConfig = field(default_factory=_large_model)  # ~60M parameters
    matmul_size: int = 2048
    seed: int = 0


def measure_peak_flops(size: int, *, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate (FLOP/s): best of ``repeats`` timed (size × size) @ (size × size)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _texts() -> list[str]:
    """What the benchmark tokenizer is trained on: the toy questions and answers."""
    from hscr_platform.training.toy_prefs import TOY_ANSWERS, TOY_QUESTIONS

    return [*(TOY_QUESTIONS * 5), *(TOY_ANSWERS * 5)]


def _build(spec: ToyModelConfig, folder: Path) -> tuple[Any, Any]:
    """A toy-architecture model from ``spec`` (untrained: speed does not depend on the weights)."""
    from hscr_platform.models.loading import ModelConfig, load_vlm
    from hscr_platform.models.toy import create_toy_model
    from hscr_platform.training.sft_loop import vision_tower

    model, processor = load_vlm(ModelConfig(path=str(create_toy_model(spec, _texts(), folder))))
    vision_tower(model).requires_grad_(False)  # as in training (freeze_vision)
    return model.train(), processor


def _batch(processor: Any, cfg: TrainBenchConfig) -> Any:
    from hscr_platform.training.pref_data import collate, to_example
    from hscr_platform.training.toy_prefs import toy_rows

    rows = toy_rows(processor.tokenizer, cfg.examples, seed=cfg.seed, levels=cfg.levels)
    examples = [to_example(r, max_levels=cfg.levels, vocab_size=len(processor.tokenizer), fingerprint="",
                           use_stored=False) for r in rows]  # fmt: skip
    return collate(examples, processor, num_levels=cfg.levels)


def _step_fn(model: Any, batch: Any, forward: Callable, pad_id: int) -> Callable[[], None]:
    """One loss forward + backward with ``forward`` (shared_prefix_logps or separate_logps)."""
    from hscr_platform.training.pref_data import as_matrix

    levels = batch.level_mask.shape[1]
    weights, ref = all_pairs_weights(levels), torch.zeros(batch.level_mask.shape)  # (L, L), (B, L)

    def step() -> None:
        flat = forward(model, batch.prefix, batch.responses, batch.owner, pad_id=pad_id)[0]  # (R,)
        per_example, _ = multilevel_dpo_loss(as_matrix(flat, batch, num_levels=levels), ref, gamma=0.1,
                                             pair_weights=weights, level_mask=batch.level_mask)  # fmt: skip
        per_example.mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def _timed(step: Callable[[], None], *, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def bench_model(spec: ToyModelConfig, cfg: TrainBenchConfig, *, iters: int, peak: float) -> dict[str, Any]:
    """Both forwards on one model: examples/s, speedup, FLOPs per step, MFU."""
    from hscr_platform.models.logprobs import separate_logps, shared_prefix_logps

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = _build(spec, Path(tmp))
    batch, pad_id = _batch(processor, cfg), processor.tokenizer.pad_token_id
    out: dict[str, Any] = {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "image_tokens": spec.num_image_tokens,
        "prefix_tokens": batch.prefix["input_ids"].shape[1],
        "response_tokens": [len(r) for r in batch.responses],
    }
    for name, forward in (("shared", shared_prefix_logps), ("baseline", separate_logps)):
        step = _step_fn(model, batch, forward, pad_id)
        seconds, flops = _timed(step, iters=iters, warmup=cfg.warmup), _flops(step)
        out[name] = {"seconds_per_step": seconds, "examples_per_s": cfg.examples / seconds,
                     "gflops_per_step": flops / 1e9, "mfu": flops / seconds / peak}  # fmt: skip
    out["speedup"] = out["shared"]["examples_per_s"] / out["baseline"]["examples_per_s"]
    return out


def run(cfg: TrainBenchConfig) -> dict[str, Any]:
    """The benchmark JSON: headline numbers on the toy model, the same on the large model, the machine."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    peak = measure_peak_flops(cfg.matmul_size)
    toy = bench_model(cfg.toy, cfg, iters=cfg.toy_iters, peak=peak)
    large = bench_model(cfg.large, cfg, iters=cfg.large_iters, peak=peak)
    return {
        "benchmark": "train",
        "examples_per_s": toy["shared"]["examples_per_s"],
        "baseline_examples_per_s": toy["baseline"]["examples_per_s"],
        "speedup": toy["speedup"],
        "mfu": toy["shared"]["mfu"],
        "large_speedup": large["speedup"],
        "large_mfu": large["shared"]["mfu"],
        "peak_matmul_gflops": peak / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "toy": toy,
        "large": large,
        "machine": {
            "threads": cfg.threads,
            "cpu_count": os.cpu_count(),
            "machine": os.uname().machine,
            "torch": torch.__version__,
        },
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }
