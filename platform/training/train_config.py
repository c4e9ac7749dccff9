"""The typed, strict config of the DPO training job, the batch arithmetic it implies, and run naming.

The loss weights (``loss.weights``) name a pair-weight matrix of :mod:`hscr.loss`; the global batch must equal
micro × workers × accumulation; a run is named by the hash of the config without the knobs that may change
between a run and its resumption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hscr_platform.core.config import config_hash
from hscr_platform.core.runtime import RayConfig
from hscr_platform.core.tracking import TrackingConfig
from hscr_platform.training.pref_data import PrefDataConfig

WeightsName = Literal["all_pairs", "explicit", "implicit", "adjacent", "dpo", "custom"]
# Targets LoRA adapters at the language model only (CLIP-style towers have q/k/v projections too).
LLM_LINEAR_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = LLM_LINEAR_LAYERS  # a regex over module names (peft full-match)
    merge: bool = True  # output a merged HF model folder; false: only the adapter (adapter/)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    path: str  # the Hugging Face VLM folder training starts from
    lora: LoraSettings = field(default_factory=LoraSettings)
    freeze_vision: bool = True  # full fine-tuning: keep the vision tower fixed (LLaVA recipes do)


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    path: str | None = None  # null: the policy's starting weights (with LoRA: the policy, adapters off)
    use_stored_logps: bool = True  # read ref_logps from the shards when their fingerprint matches


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    gamma: float = 0.1  # reward scale γ in r_i = γ (log π_θ − log π_ref)
    weights: WeightsName = "all_pairs"  # the paper's L_E + L_I
    explicit: tuple[float, ...] = ()  # custom: w_E_1..w_E_k (k = data.max_levels − 1)
    implicit: float | tuple[tuple[float, ...], ...] = 1.0  # custom: one w_I for every j < m, or a (k, k) matrix
    reduction: Literal["mean", "sum"] = "mean"  # over the global batch's examples (pairs are summed)
    nll_weight: float = 0.0  # λ of the length-normalised NLL on y_w (RPO, TRL rpo_alpha); 0 = off

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not self.nll_weight >= 0:
            raise ValueError(f"loss.nll_weight must be >= 0, got {self.nll_weight}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decay ends at lr · min_lr_ratio
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    micro_batch_size: int = 2  # examples per worker per forward
    grad_accum: int | None = None  # null: derived from the global batch
    global_batch_size: int = 16  # = micro_batch_size × workers × grad_accum (checked at load)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    epochs: int = 2
    max_steps: int | None = None  # optimizer steps; overrides epochs
    checkpoint_every: int = 50  # steps (and at the end)
    log_every: int = 10  # steps between metric reports to the driver (each ray.train.report costs ~1 s)
    keep_checkpoints: int = 2
    stop_after_steps: int | None = None  # stop cleanly (checkpointed) at this step, as if killed: for tests

    def __post_init__(self) -> None:
        if min(self.epochs, self.checkpoint_every, self.log_every, self.keep_checkpoints) < 1:
            raise ValueError("epochs, checkpoint_every, log_every and keep_checkpoints must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSettings:
    stage: Literal[0, 2, 3] = 2  # 0 = plain data parallel (DDP-like), 2 / 3 = ZeRO
    offload: bool = False  # optimizer states in CPU memory (ZeRO only)


@dataclass(frozen=True, kw_only=True)
class TrainWorkersConfig:
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 1  # lost workers recovered from the last checkpoint


@dataclass(frozen=True, kw_only=True)
class TrainOutputConfig:
    root: str = "runs"  # run folders go to <root>/train/<name>/; the MLflow store to <root>/mlflow.db
    name: str | None = None  # null: train-<hash of the config>


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """Multi-level DPO (HSCR stage 3) on Ray Train + DeepSpeed."""

    data: PrefDataConfig
    policy: PolicyConfig
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    workers: TrainWorkersConfig = field(default_factory=TrainWorkersConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute the response forward's decoder layers in backward
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="hscr-train"))
    output: TrainOutputConfig = field(default_factory=TrainOutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        batch_plan(self.batch, self.workers.num_workers)
        check_loss_levels(self.loss, self.data.max_levels)
        if self.deepspeed.offload and self.deepspeed.stage == 0:
            raise ValueError("deepspeed.offload needs ZeRO (deepspeed.stage 2 or 3)")


@dataclass(frozen=True)
class BatchPlan:
    """The one place where the batch arithmetic lives: global = micro × workers × accumulation."""

    micro: int
    workers: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.workers * self.accum


def batch_plan(batch: BatchConfig, num_workers: int) -> BatchPlan:
    """Derive (or check) gradient accumulation so that the global batch comes out exactly."""
    micro, total = batch.micro_batch_size, batch.global_batch_size
    if min(micro, total, num_workers) < 1:
        raise ValueError("batch sizes and workers.num_workers must be >= 1")
    per_round = micro * num_workers
    accum = batch.grad_accum if batch.grad_accum is not None else total // per_round
    if accum < 1 or per_round * accum != total:
        raise ValueError(
            f"batch.global_batch_size {total} != micro_batch_size {micro} × num_workers {num_workers}"
            f" × grad_accum {batch.grad_accum if batch.grad_accum is not None else '(derived)'}"
        )
    return BatchPlan(micro, num_workers, accum)


def check_loss_levels(loss: LossConfig, max_levels: int) -> None:
    """Custom weights must name every level pair; other names work for any number of levels."""
    if loss.weights != "custom":
        return
    if len(loss.explicit) != max_levels - 1:
        raise ValueError(f"loss.explicit needs {max_levels - 1} weights (data.max_levels − 1), got {loss.explicit}")
    if not isinstance(loss.implicit, float) and (
        len(loss.implicit) != max_levels - 1 or any(len(row) != max_levels - 1 for row in loss.implicit)
    ):
        raise ValueError(f"loss.implicit must be a number or a {max_levels - 1}×{max_levels - 1} matrix")


def identity(cfg: TrainJobConfig) -> TrainJobConfig:
    """The config without knobs that may change between a run and its resumption (stop point, cluster)."""
    schedule = dataclasses.replace(cfg.schedule, stop_after_steps=None)
    return dataclasses.replace(cfg, schedule=schedule, ray=RayConfig(), tracking=TrackingConfig())


def run_name(cfg: TrainJobConfig) -> str:
    return cfg.output.name or f"train-{config_hash(identity(cfg))}"


def absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Input paths made absolute: Ray Train workers run in their own working directory."""
    data = dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve()))
    policy = dataclasses.replace(cfg.policy, path=str(Path(cfg.policy.path).resolve()))
    ref = cfg.reference.path and str(Path(cfg.reference.path).resolve())
    return dataclasses.replace(cfg, data=data, policy=policy, reference=dataclasses.replace(cfg.reference, path=ref))
