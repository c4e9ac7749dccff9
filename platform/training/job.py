"""Multi-level DPO training job (``python -m jobs.train``): the driver (its config: train_config.py).

The driver checks the data and the config, opens the MLflow run, and runs the worker loop
(:mod:`hscr_platform.training.loop`) on Ray Train V2 with DeepSpeed. Outputs of run ``<name>`` live in
``<output.root>/train/<name>/``: ``ray/`` (Ray Train storage: checkpoints), ``model/`` (a Hugging Face
folder, or ``adapter/`` for an unmerged LoRA), ``metrics.jsonl``, ``loss.png``, ``margins.png``,
``config.yaml``, ``summary.json``. Re-running a killed job with the same name resumes from its last
checkpoint (same data position); re-running a finished one returns its summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hscr_platform.core.cache import DONE_MARKER, is_complete, mark_complete, read_summary
from hscr_platform.core.config import config_hash
from hscr_platform.core.runtime import init_ray
from hscr_platform.training.pref_stream import dataset_layout
from hscr_platform.training.train_config import TrainJobConfig, absolute_paths, batch_plan, identity, run_name

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
    from hscr_platform.training.policy import dtype_name

    layout = dataset_layout(cfg.data.path, max_rows=cfg.data.max_rows)
    per_step = batch_plan(cfg.batch, cfg.workers.num_workers).global_batch
    steps_per_epoch = layout.total // per_step
    if steps_per_epoch < 1:
        raise ValueError(f"{layout.total} preference rows are fewer than one global batch ({per_step})")
    total = cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch
    ref_dir = check_vlm_folder(cfg.reference.path or cfg.policy.path)
    # the precision the reference forward runs at is part of what stored log-probs are valid for
    fingerprint = model_fingerprint(ref_dir, dtype=dtype_name(cfg)) if cfg.reference.use_stored_logps else ""
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
