"""Training-forward benchmark (``python -m jobs.benchmark train``): shared-prefix vs per-response forward.

For each shape one multi-level DPO forward + backward over B examples with 1 + k responses is timed two ways:

    shared     image + prompt encoded once per example, the 1 + k responses read its KV cache (this project)
    baseline   one full image + prompt + response sequence per response, batched (TRL-style concatenation)

Shapes: ``toy`` (the demo's base-model architecture, 64 image tokens, 2–13-token toy answers), ``large`` (the
same answers on a ~60M-parameter model) and ``llava`` (LLaVA-Med's shape: 576 image tokens, answers of 30–100
tokens, 1 + 3 levels, the largest model whose step stays a few seconds on 2 cores). Reported per shape: the
median / min / max of ``iters`` timed steps (≥ 5) for each forward (the two alternate), ``speedup`` = ratio
of the median examples/s, the FLOPs of one step of each (torch's FlopCounterMode), ``flop_bound`` = baseline
FLOPs / shared FLOPs (the speedup if time followed FLOPs) and ``of_bound`` = speedup / flop_bound, MFU against
the matmul peak of this machine measured in the same run, peak RSS.
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

import numpy as np
import torch

from hscr.loss import all_pairs_weights, multilevel_dpo_loss
from hscr_platform.bench.common import spread
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


def _llava_model() -> ToyModelConfig:
    """576 image tokens (192 px, patch 8) as LLaVA-1.5's CLIP-L/336; a ~25M-parameter language model."""
    return ToyModelConfig(vocab_size=512, image_size=192, patch_size=8, vision_hidden=128, vision_layers=2,
                          vision_heads=4, text_hidden=512, text_layers=6, text_heads=8, text_intermediate=1408,
                          max_positions=1024)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LlavaTrainShape:
    enabled: bool = True
    examples: int = 2  # B per step
    min_answer_tokens: int = 30
    max_answer_tokens: int = 100
    iters: int = 5
    model: ToyModelConfig = field(default_factory=_llava_model)


@dataclass(frozen=True, kw_only=True)
class TrainBenchConfig:
    """Sizes of the training benchmark (defaults: some minutes on 2 CPU cores)."""

    examples: int = 4  # B examples per step
    levels: int = 4  # 1 + k responses per example (k = 3)
    threads: int = 2
    toy_iters: int = 10
    large_iters: int = 5
    warmup: int = 1
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)  # the demo's base-model architecture
    large: ToyModelConfig = field(default_factory=_large_model)  # ~60M parameters
    llava: LlavaTrainShape = field(default_factory=LlavaTrainShape)
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


def _batch(processor: Any, cfg: TrainBenchConfig, *, examples: int, answer_tokens: tuple[int, int] | None) -> Any:
    """Toy rows (``answer_tokens`` None), or toy rows whose 1 + k responses are replaced by random token ids of
    lengths in ``answer_tokens`` (ending in EOS): the LLaVA-shaped instruction answers."""
    from hscr_platform.training.pref_data import collate, to_example
    from hscr_platform.training.toy_prefs import toy_rows

    tok = processor.tokenizer
    rows = toy_rows(tok, examples, seed=cfg.seed, levels=cfg.levels)
    if answer_tokens is not None:
        rng, low = np.random.default_rng(cfg.seed), 5  # ids below 5 may be special tokens
        for row in rows:
            lengths = rng.integers(answer_tokens[0], answer_tokens[1] + 1, size=cfg.levels)
            row["response_token_ids"] = [[*rng.integers(low, len(tok), size=n - 1).tolist(), tok.eos_token_id]
                                         for n in lengths]  # fmt: skip
    examples_ = [to_example(r, max_levels=cfg.levels, vocab_size=len(tok), fingerprint="", use_stored=False)
                 for r in rows]  # fmt: skip
    return collate(examples_, processor, num_levels=cfg.levels)


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


def _timed(steps: dict[str, Callable[[], None]], *, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each of ``iters`` calls of every step after ``warmup`` untimed ones; the steps alternate, so
    a load change on a shared machine hits them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def bench_model(spec: ToyModelConfig, cfg: TrainBenchConfig, *, iters: int, peak: float, examples: int,
                answer_tokens: tuple[int, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Both forwards on one model: examples/s (median / min / max), speedup, FLOPs per step, bound, MFU."""
    from hscr_platform.models.logprobs import separate_logps, shared_prefix_logps

    if iters < 5:
        raise ValueError(f"iters must be >= 5 (median of at least 5 repeats), got {iters}")
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = _build(spec, Path(tmp))
    batch, pad_id = (
        _batch(processor, cfg, examples=examples, answer_tokens=answer_tokens),
        processor.tokenizer.pad_token_id,
    )
    out: dict[str, Any] = {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "image_tokens": spec.num_image_tokens,
        "examples": examples,
        "prefix_tokens": batch.prefix["input_ids"].shape[1],
        "response_tokens": [len(r) for r in batch.responses],
    }
    steps = {name: _step_fn(model, batch, forward, pad_id)
             for name, forward in (("shared", shared_prefix_logps), ("baseline", separate_logps))}  # fmt: skip
    timings = _timed(steps, iters=iters, warmup=cfg.warmup)
    for name, step in steps.items():
        seconds, flops = timings[name], _flops(step)
        median = spread(seconds)["median"]
        out[name] = {"seconds_per_step": spread(seconds), "examples_per_s": spread([examples / t for t in seconds]),
                     "gflops_per_step": round(flops / 1e9, 3), "mfu": round(flops / median / peak, 4)}  # fmt: skip
    out["speedup"] = round(out["shared"]["examples_per_s"]["median"] / out["baseline"]["examples_per_s"]["median"], 2)
    out["flop_bound"] = round(out["baseline"]["gflops_per_step"] / out["shared"]["gflops_per_step"], 2)
    out["of_bound"] = round(out["speedup"] / out["flop_bound"], 2)
    return out


def run(cfg: TrainBenchConfig) -> dict[str, Any]:
    """The benchmark JSON: headline numbers on the toy model, the large model and the LLaVA-Med shape."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    peak = measure_peak_flops(cfg.matmul_size)
    toy = bench_model(cfg.toy, cfg, iters=cfg.toy_iters, peak=peak, examples=cfg.examples)
    large = bench_model(cfg.large, cfg, iters=cfg.large_iters, peak=peak, examples=cfg.examples)
    shape = cfg.llava
    llava = (bench_model(shape.model, cfg, iters=shape.iters, peak=peak, examples=shape.examples,
                         answer_tokens=(shape.min_answer_tokens, shape.max_answer_tokens))
             if shape.enabled else None)  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "train",
        "speedup": toy["speedup"],
        "flop_bound": toy["flop_bound"],
        "examples_per_s": toy["shared"]["examples_per_s"],
        "baseline_examples_per_s": toy["baseline"]["examples_per_s"],
        "mfu": toy["shared"]["mfu"],
        "large_speedup": large["speedup"],
        "large_flop_bound": large["flop_bound"],
        "large_mfu": large["shared"]["mfu"],
    }
    if llava is not None:
        result.update(llava_speedup=llava["speedup"], llava_flop_bound=llava["flop_bound"],
                      llava_of_bound=llava["of_bound"], llava_mfu=llava["shared"]["mfu"])  # fmt: skip
    result.update({
        "peak_matmul_gflops": round(peak / 1e9, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "toy": toy,
        "large": large,
        "llava": llava,
        "machine": {"threads": cfg.threads, "cpu_count": os.cpu_count(), "machine": os.uname().machine,
                    "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    })  # fmt: skip
    return result
