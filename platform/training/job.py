"""Multi-level DPO training job (``python -m jobs.train``): config, batch arithmetic, and the driver.

The driver checks the data and the config, opens the MLflow run, and runs the worker loop
(:mod:`hscr_platform.training.loop`) on Ray Train V2 with DeepSpeed. Outputs of run ``<name>`` live in
``<output.root>/train/<name>/``: ``ray/`` (Ray Train storage: checkpoints), ``model/`` (a Hugging Face
folder, or ``adapter/`` for an unmerged LoRA), ``metrics.jsonl``, ``loss.png``, ``margins.png``,
``config.yaml``, ``summary.json``. Re-running a killed job with the same name resumes from its last
checkpoint (same data position); re-running a finished one returns its summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.core.cache import DONE_MARKER, is_complete, mark_complete, read_summary
from hscr_platform.core.config import config_hash
from hscr_platform.core.runtime import RayConfig, init_ray
from hscr_platform.core.tracking import TrackingConfig
from hscr_platform.training.pref_data import PrefDataConfig
from hscr_platform.training.pref_stream import dataset_layout

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
    reduction: Literal["mean", "sum"] = "mean"  # over examples (pairs are summed)

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")


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


# --- the driver ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the workers need besides the config: the data layout, step counts, the reference fingerprint."""

    layout: Any  # pref_data.Layout
    steps_per_epoch: int
    total_steps: int
    ref_fingerprint: str


def make_plan(cfg: TrainJobConfig) -> Plan:
    from hscr_platform.models.loading import check_vlm_folder
    from hscr_platform.models.logprobs import model_fingerprint

    layout = dataset_layout(cfg.data.path, max_rows=cfg.data.max_rows)
    per_step = batch_plan(cfg.batch, cfg.workers.num_workers).global_batch
    steps_per_epoch = layout.total // per_step
    if steps_per_epoch < 1:
        raise ValueError(f"{layout.total} preference rows are fewer than one global batch ({per_step})")
    total = cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch
    ref_dir = check_vlm_folder(cfg.reference.path or cfg.policy.path)
    fingerprint = model_fingerprint(ref_dir) if cfg.reference.use_stored_logps else ""
    return Plan(layout, steps_per_epoch, total, fingerprint)


@contextlib.contextmanager
def claim(cfg: TrainJobConfig, run_dir: Path) -> Iterator[None]:
    """Bind the run name to one config (resuming with another would mix two trainings) and to one live
    driver on this host (two drivers would overwrite each other's checkpoints)."""
    marker, lock, ident = run_dir / "identity.json", run_dir / "driver.lock", config_hash(identity(cfg))
    if marker.is_file() and json.loads(marker.read_text())["identity"] != ident:
        raise ValueError(f"run {run_dir.name} was started with a different config; use another output.name")
    other = json.loads(lock.read_text()) if lock.is_file() else {}
    if other.get("host") == socket.gethostname() and _alive(other["pid"]):
        raise ValueError(f"run {run_dir.name} is being trained by pid {other['pid']} (else delete {lock})")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"identity": ident}))
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


STATUS_FILE = "last_report.json"


def _last_report_callback(path: Path) -> Any:
    """Saves rank 0's last report (done / stopped / error) for the driver: ``Result.metrics`` only holds the
    metrics of the last *checkpoint*, and a stop on a non-finite loss reports without one."""
    from ray.train import UserCallback

    path = path.resolve()  # the callback runs in the Train controller, on this node, in another directory

    class _LastReport(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                path.write_text(json.dumps({k: v for k, v in metrics[0].items() if k != "history"}))

    return _LastReport()


def _fit(cfg: TrainJobConfig, plan: Plan, run_dir: Path, tracked: Any, callbacks: Sequence[Any] = ()) -> Any:
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from hscr_platform.core.tracking import ray_train_callback
    from hscr_platform.training.ds_config import worker_env
    from hscr_platform.training.loop import worker_loop

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg, "plan": plan},
        torch_config=TorchConfig(backend="nccl" if cfg.workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers.num_workers,
            use_gpu=cfg.workers.use_gpu,
            resources_per_worker={"CPU": cfg.workers.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str((run_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=cfg.workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
            callbacks=[
                _last_report_callback(run_dir / STATUS_FILE),
                *([ray_train_callback(tracked)] if tracked else []),
                *callbacks,
            ],
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    return trainer.fit()


def _start_tracking(cfg: TrainJobConfig, run_dir: Path, name: str) -> Any:
    if not cfg.tracking.enabled:
        return None
    from hscr_platform.core.tracking import log_config, start_run, tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.output.root)
    tracked = start_run(
        uri=uri,
        experiment=cfg.tracking.experiment,
        run_name=name,
        tags={"job": "train", "run_dir": str(run_dir.resolve())},
        parent_run_id=cfg.tracking.parent_run_id,
    )
    log_config(tracked, cfg)
    print(
        f"[train] mlflow run {tracked.run_id} ({'re-attached' if tracked.resumed else 'new'}; {uri})",
        flush=True,
    )
    return tracked


def _plots(history: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    from hscr_platform.core.plots import plot_training_curves

    out = []
    for name, keep in (("loss", ("loss", "rewards/accuracies")), ("margins", ("rewards/margins",))):
        lines = [{"step": h["step"], **{k: v for k, v in h.items() if k.startswith(keep)}} for h in history]
        jsonl = run_dir / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
        out.append(plot_training_curves(jsonl, run_dir / f"{name}.png", smooth=max(1, len(history) // 20)))
        jsonl.unlink()
    return out


def _finish(cfg: TrainJobConfig, ckpt_dir: Path, run_dir: Path, tracked: Any) -> dict[str, Any]:
    """Copy the final model out of the last checkpoint, plot, log artifacts, mark the run complete."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    model_name = "adapter" if (ckpt_dir / "adapter").is_dir() else "model"
    shutil.rmtree(run_dir / model_name, ignore_errors=True)
    shutil.copytree(ckpt_dir / model_name, run_dir / model_name)
    history = state["history"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    plots = _plots(history, run_dir) if history else []
    summary = {
        model_name: str(run_dir / model_name),
        "steps": state["step"],
        "counts": total_counts(history),
        "final": {k: v for k, v in history[-1].items() if k != "counts"} if history else {},
    }
    if tracked is not None:
        _log_final(tracked, history, plots, run_dir / model_name, cfg)
    mark_complete(run_dir, cfg, **summary)
    return summary


def total_counts(history: list[dict[str, Any]]) -> dict[str, int]:
    """Skipped rows by reason and reference forwards by cause, over the whole run."""
    total: dict[str, int] = {}
    for record in history:
        for key, n in record.get("counts", {}).items():
            total[key] = total.get(key, 0) + n
    return total


def _log_final(tracked: Any, history: list, plots: list[Path], model_dir: Path, cfg: TrainJobConfig) -> None:
    from hscr_platform.core.tracking import end_run, log_artifacts, log_metrics_history

    log_metrics_history(tracked, history)
    for png in plots:
        log_artifacts(tracked, png)
    if cfg.tracking.log_model:
        log_artifacts(tracked, model_dir, model_dir.name)
    end_run(tracked, "FINISHED")


def run(cfg: TrainJobConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (or resume, or reuse) run ``output.name``; returns its summary."""
    name = run_name(cfg)
    run_dir = Path(cfg.output.root) / "train" / name
    cfg = absolute_paths(cfg)
    if is_complete(run_dir):
        print(f"[train] already complete: {run_dir} ({DONE_MARKER} present)")
        return read_summary(run_dir)
    with claim(cfg, run_dir):
        return _train(cfg, run_dir, name, callbacks)


def _train(cfg: TrainJobConfig, run_dir: Path, name: str, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    plan = make_plan(cfg)
    batch = batch_plan(cfg.batch, cfg.workers.num_workers)
    print(f"[train] run {name}: {plan.layout.total} rows, {plan.steps_per_epoch} steps/epoch, "
          f"{plan.total_steps} steps, global batch {batch.global_batch} = {batch.micro} × {batch.workers} × "
          f"{batch.accum}", flush=True)  # fmt: skip
    init_ray(cfg.ray)
    tracked = _start_tracking(cfg, run_dir, name)
    (run_dir / STATUS_FILE).unlink(missing_ok=True)
    try:
        result = _fit(cfg, plan, run_dir, tracked, callbacks)
    except Exception:  # workers failed more often than workers.max_failures allows
        if tracked is not None:
            from hscr_platform.core.tracking import end_run

            end_run(tracked, "FAILED")
        raise
    last = json.loads((run_dir / STATUS_FILE).read_text()) if (run_dir / STATUS_FILE).is_file() else {}
    if result.checkpoint is None:
        return _conclude(cfg, last, None, run_dir, tracked, plan)
    with result.checkpoint.as_directory() as ckpt:
        return _conclude(cfg, last, Path(ckpt), run_dir, tracked, plan)


def _conclude(cfg: TrainJobConfig, metrics: dict, ckpt: Path | None, run_dir: Path, tracked: Any, plan: Plan) -> dict:
    """Finished: export and log. Stopped on purpose: say how to resume. Non-finite loss: fail, naming it."""
    from hscr_platform.core.tracking import end_run

    if metrics.get("done") and ckpt is not None:
        summary = _finish(cfg, ckpt, run_dir, tracked)
        print(f"[train] done: {summary['steps']} steps, final {_short(summary['final'])}; "
              f"counts {summary['counts']}; {run_dir}", flush=True)  # fmt: skip
        return summary
    if tracked is not None:  # the records reported so far were logged live by the tracking callback
        end_run(tracked, "FAILED" if metrics.get("error") else "KILLED")
    if metrics.get("error"):
        raise RuntimeError(f"training stopped: {metrics['error']} (last good checkpoint: {ckpt})")
    print(f"[train] stopped at step {metrics.get('step')} of {plan.total_steps} (checkpoint {ckpt}); "
          "re-run the same command to resume", flush=True)  # fmt: skip
    return {"stopped_at": metrics.get("step"), "checkpoint": str(ckpt)}


def _short(record: dict[str, Any]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    return " ".join(f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), float))
