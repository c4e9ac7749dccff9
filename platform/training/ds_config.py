"""DeepSpeed glue: the config dict built from the typed training config, the engine, checkpoints, weights.

ZeRO stage 0 (plain data parallel), 2 (optimizer states + gradients partitioned) or 3 (parameters too);
optional CPU offload of optimizer states. The optimizer is torch's AdamW (``torch_adam``), so DeepSpeed never
compiles its C++ Adam; the learning rate is set by the worker loop every step (no DeepSpeed scheduler), so a
resumed run needs no scheduler state. DeepSpeed's CPU communication op is still compiled once (~30 s) into
``TORCH_EXTENSIONS_DIR``, which defaults to a cache folder here so that later runs reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Environment every training worker gets (set in the driver, passed through Ray's runtime env).
_WORKER_ENV_DEFAULTS = {
    "DS_BUILD_OPS": "0",  # never pre-build DeepSpeed's C++ ops
    "OMP_WAIT_POLICY": "PASSIVE",  # busy-waiting OpenMP threads starve a shared core
    "TOKENIZERS_PARALLELISM": "false",
}


def worker_env(cache_root: str | Path = ".cache") -> dict[str, str]:
    """Env vars for DeepSpeed workers: a user's own values win; TORCH_EXTENSIONS_DIR defaults to a cache."""
    env = {k: os.environ.get(k, v) for k, v in _WORKER_ENV_DEFAULTS.items()}
    default_ext = Path(cache_root).resolve() / "torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", str(default_ext))
    return env


def deepspeed_config(
    *,
    stage: int,
    offload: bool,
    micro: int,
    accum: int,
    global_batch: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    bf16: bool,
) -> dict[str, Any]:
    """DeepSpeed's config for one training run; ``global_batch`` must equal micro × world × accum."""
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW instead of the compiled CPU Adam
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling (and initialising) its CPU shared-memory all-reduce op.

    DeepSpeed's torch backend JIT-builds ``deepspeed_shm_comm`` on the CPU accelerator when its op probe says the
    op is compatible, although only ``inference_all_reduce`` uses it: training's collectives go through
    torch.distributed (gloo here). The build costs a minute of both cores, and it is redone whenever a job finds
    another ninja on its PATH (the venv's and the system's write incompatible build logs), so jobs rebuilt it
    again and again. The op probe itself runs compiler subprocesses (~9 s per worker). Its one consumer reads
    ``deepspeed.ops.__compatible_ops__.get(name, False)``, so an empty table turns the op off and skips the probe.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def build_engine(model: Any, ds_config: dict[str, Any]) -> Any:
    """A DeepSpeed engine over the trainable parameters (torch.distributed is already set up by Ray Train)."""
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    skip_shm_comm_op()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


TAG = "ds"  # one DeepSpeed checkpoint per reported checkpoint folder


def save_checkpoint(engine: Any, folder: str | Path, *, trainable_only: bool) -> None:
    """Every rank writes its partition (ZeRO) into ``folder``; Ray Train merges the ranks' folders."""
    engine.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=trainable_only)


def load_checkpoint(engine: Any, folder: str | Path, *, trainable_only: bool) -> None:
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=not trainable_only,
                                     load_lr_scheduler_states=False)  # fmt: skip
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{TAG}' in {folder}")


def full_state_dict(engine: Any) -> dict[str, Any] | None:
    """The whole module's weights on CPU on rank 0 (None elsewhere); collective under ZeRO-3."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
