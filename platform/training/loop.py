"""The multi-level DPO worker loop (runs inside every Ray Train worker; no trainer class).

Per optimizer step each worker takes ``accum`` micro-batches from its slice of the preference stream. For each
micro-batch: reference log-probs come from the shards (fingerprint matches) or from a no-grad forward of the
frozen reference; the policy scores the 1 + k responses with the shared-prefix forward (image + prompt once);
``multilevel_dpo_loss`` gives the loss; DeepSpeed accumulates and steps. Metrics are all-reduced every step,
reported to the driver every ``log_every`` steps and with each checkpoint (``ray.train.report``). A non-finite
loss or gradient norm stops the run without a new checkpoint, naming the step and the examples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hscr.loss import (
    adjacent_weights,
    all_pairs_weights,
    explicit_weights,
    implicit_weights,
    level_weights,
    multilevel_dpo_loss,
)
from hscr_platform.models.logprobs import shared_prefix_logps
from hscr_platform.training.checkpoints import LoopState, checkpoint, finish, report, restore
from hscr_platform.training.policy import Reference, load_policy
from hscr_platform.training.pref_data import (
    REF_RECOMPUTE,
    SKIP_REASONS,
    PrefBatch,
    Prepared,
    SkipLog,
    as_matrix,
    prepare,
)
from hscr_platform.training.pref_stream import Slicing, iter_micro_batches

LOG = "[train]"


# --- pieces (pure functions, unit-tested) --------------------------------------------------------


def pair_weights(loss: Any, num_levels: int) -> torch.Tensor:
    """The (L, L) pair-weight matrix named by ``loss.weights`` (see hscr.loss)."""
    if loss.weights == "custom":
        return level_weights(explicit=loss.explicit, implicit=loss.implicit)
    if loss.weights == "dpo":
        weights = torch.zeros(num_levels, num_levels)  # (L, L): y_w vs y_l1 only
        weights[0, 1] = 1.0
        return weights
    builders = {"all_pairs": all_pairs_weights, "explicit": explicit_weights, "implicit": implicit_weights,
                "adjacent": adjacent_weights}  # fmt: skip
    return builders[loss.weights](num_levels)


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``base_lr · min_ratio`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_loss(per_example: torch.Tensor, *, reduction: str, nominal: int, micro_batches: int) -> torch.Tensor:
    """One micro-batch's loss, scaled so that DeepSpeed's averaging gives ``loss.reduction`` over the global batch.

    DeepSpeed divides each micro-batch's loss by the accumulation steps and averages the gradients over
    workers: it averages over the ``micro_batches = workers × accum`` micro-batches of a step. Hence
    - mean: ``Σ_b loss_b / nominal`` (nominal = micro-batch size; a skipped row counts as zero, never
      reweighting the others) → the mean over the nominal global batch;
    - sum: ``Σ_b loss_b · micro_batches`` → the sum over the global batch (its gradient is the sum of the
      per-example gradients, whatever the worker / accumulation split).
    """
    total = per_example.sum()  # ()
    if reduction == "mean":
        return total / nominal
    if reduction == "sum":
        return total * micro_batches
    raise ValueError(f"unknown loss.reduction {reduction!r}; expected 'mean' or 'sum'")


class NonFinite(RuntimeError):
    """A loss or gradient norm that is NaN or inf: training stops at the last good checkpoint."""


# --- distributed helpers ----------------------------------------------------------------------------


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over workers (no-op without a process group)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)  # (N,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def any_worker(flag: bool, device: torch.device) -> bool:
    return all_sum([float(flag)], device)[0] > 0


def gather_ids(ids: list[str]) -> list[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return ids
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, ids)
    return [i for part in out for i in part]


# --- one step -----------------------------------------------------------------------------------------


@dataclass
class StepContext:
    cfg: Any
    engine: Any
    reference: Reference
    processor: Any
    weights: torch.Tensor  # (L, L)
    device: torch.device
    nominal: int  # micro-batch size
    grad_norm: float | None = None  # computed here where DeepSpeed keeps none (stage 0, fp32)
    micro_batches: int = 1  # micro-batches DeepSpeed averages a step's gradients over: workers × accum


def _to_device(prefix: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in prefix.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def micro_step(ctx: StepContext, batch: PrefBatch, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Reference, policy forward, loss, backward for one micro-batch; returns (loss, reward metrics)."""
    pad_id, num_levels = ctx.processor.tokenizer.pad_token_id, ctx.weights.shape[0]
    prefix = _to_device(batch.prefix, ctx.device, next(ctx.engine.module.parameters()).dtype)
    ref = batch.ref_logps.to(ctx.device)  # (B, L)
    if any_worker(bool(batch.needs_ref.any()), ctx.device):
        computed = as_matrix(ctx.reference.logps(batch, prefix, pad_id).float(), batch, num_levels=num_levels)
        ref = torch.where(batch.needs_ref.to(ctx.device)[:, None], computed, ref)  # (B, L)
    flat, _, resp_mask = shared_prefix_logps(ctx.engine, prefix, batch.responses, batch.owner, pad_id=pad_id,
                                             activation_checkpointing=ctx.cfg.activation_checkpointing)  # fmt: skip
    policy = as_matrix(flat.float(), batch, num_levels=num_levels)  # (B, L)
    chosen_tokens = as_matrix(resp_mask.sum(-1).float(), batch, num_levels=num_levels)[:, 0]  # (B,) |y_w|
    mask = batch.level_mask.to(ctx.device)  # (B, L)
    loss_cfg = ctx.cfg.loss
    per_example, metrics = multilevel_dpo_loss(
        policy, ref, gamma=loss_cfg.gamma, pair_weights=ctx.weights, level_mask=mask,
        nll_weight=loss_cfg.nll_weight, chosen_tokens=chosen_tokens,
    )  # (B,)  # fmt: skip
    loss = micro_loss(per_example, reduction=loss_cfg.reduction, nominal=ctx.nominal,
                      micro_batches=ctx.micro_batches)  # fmt: skip
    if any_worker(not bool(torch.isfinite(loss)), ctx.device):  # every worker stops at the same step
        ids = gather_ids(batch.ids)
        raise NonFinite(f"non-finite loss at step {step}; examples of the micro-batch: {ids}")
    ctx.engine.backward(loss)
    if ctx.engine.is_gradient_accumulation_boundary() and not ctx.engine.zero_optimization():
        grads = [p.grad for p in ctx.engine.module.parameters() if p.grad is not None]  # averaged over workers
        ctx.grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
    ctx.engine.step()  # DeepSpeed updates only at the accumulation boundary
    return float(loss.detach()), metrics


def _set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _add(sums: dict[str, float], key: str, value: float, weight: float) -> None:
    """Weighted sums with a fixed key set (every worker must all-reduce the same keys); NaN adds nothing."""
    ok = math.isfinite(value)
    sums[key] = sums.get(key, 0.0) + (value * weight if ok else 0.0)
    sums[f"{key}#n"] = sums.get(f"{key}#n", 0.0) + (weight if ok else 0.0)


def train_step(ctx: StepContext, prepared: list[Prepared], step: int, total: int) -> dict[str, Any]:
    """One optimizer step over ``accum`` micro-batches; returns the record averaged over all workers."""
    opt = ctx.cfg.optim
    lr = lr_at(step, base_lr=opt.lr, warmup=opt.warmup_steps, total=total, min_ratio=opt.min_lr_ratio)
    _set_lr(ctx.engine, lr)
    start, sums = time.perf_counter(), dict[str, float]()
    for item in prepared:
        loss, metrics = micro_step(ctx, item.batch, step)
        _add(sums, "loss", loss, 1.0)
        for key, value in metrics.items():
            _add(sums, key, float(value), item.batch.num_valid)  # means over valid examples
        _add(sums, "examples", float(item.batch.num_valid), 1.0)
        for reason in SKIP_REASONS:
            _add(sums, f"skipped/{reason}", float(item.skipped[reason]), 1.0)
        for status in REF_RECOMPUTE:
            _add(sums, f"ref_recomputed/{status}", float(item.recomputed[status]), 1.0)
    keys = sorted(sums)
    total_sums = dict(zip(keys, all_sum([sums[k] for k in keys], ctx.device), strict=True))
    norm = ctx.engine.get_global_grad_norm()  # None without ZeRO or mixed precision
    norm = ctx.grad_norm if norm is None else norm
    return _record(total_sums, step=step, lr=lr, seconds=time.perf_counter() - start, norm=norm)


def _record(sums: dict[str, float], *, step: int, lr: float, seconds: float, norm: Any) -> dict[str, Any]:
    counts = [k for k in sums if k.startswith(("skipped/", "ref_recomputed/")) and not k.endswith("#n")]
    means = [k for k in sums if not k.endswith("#n") and k not in counts and k != "examples"]
    record: dict[str, Any] = {"step": step, "lr": lr, "grad_norm": math.nan if norm is None else float(norm),
                              "examples_per_s": sums["examples"] / max(seconds, 1e-9)}  # fmt: skip
    record.update({k: sums[k] / sums[f"{k}#n"] for k in means if sums[f"{k}#n"] > 0})
    record["skipped_rows"] = sum(sums[k] for k in counts if k.startswith("skipped/"))
    record["ref_forward_rows"] = sum(sums[k] for k in counts if k.startswith("ref_recomputed/"))
    record["counts"] = {k: int(sums[k]) for k in counts if sums[k]}
    if norm is not None and not math.isfinite(float(norm)):
        raise NonFinite(f"non-finite gradient norm at step {step} (this update is never checkpointed)")
    return record


# --- data -----------------------------------------------------------------------------------------------


def prepared_batches(cfg: Any, plan: Any, part: Slicing, *, start_step: int, global_batch: int,
                     processor: Any) -> Iterator[Prepared]:  # fmt: skip
    """This worker's collated micro-batches from ``start_step`` on, bad rows dropped with a counted reason."""
    log = SkipLog(prefix=f"{LOG} worker {part.rank}:", limit=cfg.data.log_skipped)
    raw = iter_micro_batches(plan.layout, cfg.data, part, seed=cfg.seed, start_step=start_step,
                             steps_per_epoch=plan.steps_per_epoch, global_batch=global_batch)  # fmt: skip
    for rows in raw:
        yield prepare(rows, processor, cfg.data, fingerprint=plan.ref_fingerprint,
                      use_stored=cfg.reference.use_stored_logps, log=log)  # fmt: skip


# --- the loop -------------------------------------------------------------------------------------------


def _print(rank: int, record: dict[str, Any], total: int) -> None:
    if rank == 0:
        keys = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "examples_per_s")
        shown = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
        print(f"{LOG} step {record['step'] + 1}/{total} {shown}", flush=True)


def _quiet_ray_reports() -> None:
    """Ray logs every report with its full metrics (our history lists): keep warnings only."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a private module: nothing to quiet if it moved
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _setup(cfg: Any) -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    _quiet_ray_reports()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.workers.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # the same initial (LoRA) weights on every worker
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def worker_loop(payload: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: restore, train ``plan.total_steps`` steps, export the model."""
    from hscr_platform.training.ds_config import build_engine, deepspeed_config
    from hscr_platform.training.train_config import batch_plan

    cfg, plan = payload["cfg"], payload["plan"]
    rank, world, device = _setup(cfg)
    batch = batch_plan(cfg.batch, world)
    model, processor = load_policy(cfg)
    engine = build_engine(model.to(device), deepspeed_config(
        stage=cfg.deepspeed.stage, offload=cfg.deepspeed.offload, micro=batch.micro, accum=batch.accum,
        global_batch=batch.global_batch, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        grad_clip=cfg.optim.grad_clip, bf16=cfg.precision == "bf16"))  # fmt: skip
    state = restore(engine, cfg)
    if state.done or state.step >= plan.total_steps:
        return report(state, [], rank=rank)
    if state.step and rank == 0:
        print(f"{LOG} resuming at step {state.step} of {plan.total_steps}", flush=True)
    ctx = StepContext(cfg, engine, Reference(cfg, engine, device), processor,
                      pair_weights(cfg.loss, cfg.data.max_levels), device, batch.micro,
                      micro_batches=batch.workers * batch.accum)  # fmt: skip
    part = Slicing(rank=rank, world=world, micro=batch.micro)
    stream = prepared_batches(cfg, plan, part, start_step=state.step, global_batch=batch.global_batch,
                              processor=processor)  # fmt: skip
    _train(ctx, stream, state, plan.total_steps, rank=rank, accum=batch.accum)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout randomness per (worker, step): a resumed run draws what an uninterrupted one would."""
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**31


def _train(ctx: StepContext, stream: Iterator[Prepared], state: LoopState, total: int, *, rank: int,
           accum: int) -> None:  # fmt: skip
    sched, pending = ctx.cfg.schedule, list[dict[str, Any]]()
    while state.step < total:
        torch.manual_seed(step_seed(ctx.cfg.seed, rank, state.step))
        try:
            record = train_step(ctx, [next(stream) for _ in range(accum)], state.step, total)
        except NonFinite as exc:  # every worker raised it at the same step: report, keep the last checkpoint
            return report(state, pending, rank=rank, error=str(exc))
        state.history.append(record)
        pending.append(record)
        state.step += 1
        if state.step % sched.log_every == 0 or state.step == total:
            _print(rank, record, total)
        stop = state.step == sched.stop_after_steps
        if state.step < total and (state.step % sched.checkpoint_every == 0 or stop):
            checkpoint(ctx.engine, state, pending, cfg=ctx.cfg, rank=rank)
            pending = []
        elif state.step < total and state.step % sched.log_every == 0:
            report(state, pending, rank=rank)
            pending = []
        if stop and state.step < total:
            return None
    return finish(ctx.engine, state, pending, cfg=ctx.cfg, processor=ctx.processor, rank=rank)
