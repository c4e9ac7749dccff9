"""The supervised fine-tuning worker loop (runs inside every Ray Train worker; no trainer class).

Two phases, as real LLaVA models are built: (1) the vision tower learns the scene labels (modality, organ, which
finding is where) through a linear probe on its patch tokens, the features the projector will read;
(2) the tower is frozen and the projector + language model learn to answer questions (loss on answer tokens).
Phase 1 needs ground-truth scene labels (SynthMed); with ``vision_pretrain.steps = 0`` it is skipped.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hscr_platform.core.io import iter_rows
from hscr_platform.models.loading import ModelConfig, encode_for_training, load_vlm, open_image


@dataclass(frozen=True)
class LabelSpace:
    """Names of the scene labels the vision probe predicts (derived once from the training data)."""

    modalities: tuple[str, ...]
    organs: tuple[str, ...]
    kinds: tuple[str, ...]
    positions: tuple[str, ...]

    @property
    def size(self) -> int:
        n_kinds = len(self.kinds)
        return len(self.modalities) + len(self.organs) + n_kinds + n_kinds * len(self.positions)

    def encode(self, row: dict[str, Any]) -> list[float]:
        """Multi-hot vector: modality, organ, kind present, kind at position."""
        vec = [float(row.get("modality") == m) for m in self.modalities]
        vec += [float(row.get("organ") == o) for o in self.organs]
        found = {(f["kind"], f["position"]) for f in row.get("findings") or []}
        vec += [float(any(k == kind for kind, _ in found)) for k in self.kinds]
        vec += [float((k, p) in found) for k in self.kinds for p in self.positions]
        return vec


def label_space_of(folder: str | Path) -> LabelSpace:
    """Every modality / organ / finding kind / position that occurs in a sample dataset (no images read)."""
    mods, organs, kinds, positions = set(), set(), set(), set()
    for row in iter_rows(folder, columns=["modality", "organ", "findings"]):
        mods.add(row["modality"] or "")
        organs.add(row["organ"] or "")
        for f in row["findings"] or []:
            kinds.add(f["kind"])
            positions.add(f["position"])
    return LabelSpace(*(tuple(sorted(s - {""})) for s in (mods, organs, kinds, positions)))


def load_worker_rows(folders: Sequence[str | Path], *, rank: int, world: int, max_rows: int | None) -> list[dict]:
    """This worker's share of the rows (every world-th row), images decoded once. ``max_rows`` caps the first
    folder (data.train); later folders (instruction data) are read whole."""
    rows, position = [], 0
    for number, folder in enumerate(folders):
        for i, row in enumerate(iter_rows(folder)):
            if number == 0 and max_rows is not None and i >= max_rows:
                break
            if position % world == rank:
                row["pil"] = open_image(row.pop("image"))
                rows.append(row)
            position += 1
    if not rows:
        raise ValueError(f"worker {rank}/{world} got no training rows from {list(map(str, folders))}")
    return rows


def batch_indices(n: int, batch: int, *, seed: int) -> Iterator[list[int]]:
    """Endless batches of row indices: a fresh permutation per epoch, seeded for determinism."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - batch + 1, batch):
            yield perm[start : start + batch]


def length_grouped_batches(lengths: Sequence[int], batch: int, *, seed: int, pool: int = 64) -> Iterator[list[int]]:
    """Endless batches of rows of similar length, so that little of a padded batch is padding.

    Each epoch: a seeded permutation (full batches only, as ``batch_indices``), cut into pools of ``pool``
    batches; each pool is sorted by length and cut into batches; the epoch's batches are then shuffled. Every
    row is still seen once per epoch, and which rows share a batch stays random beyond their length.
    """
    if batch < 1 or pool < 1:
        raise ValueError("batch and pool must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths) - len(lengths) % batch
    while True:
        perm = torch.randperm(len(lengths), generator=gen).tolist()[:n]
        batches: list[list[int]] = []
        for start in range(0, n, pool * batch):
            chunk = sorted(perm[start : start + pool * batch], key=lambda i: lengths[i])
            batches += [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]


def text_length(row: dict[str, Any]) -> int:
    """A row's length for grouping: characters of its question and answer (the image adds the same to all)."""
    return len(row["question"]) + len(row["answer"])


def lr_at(step: int, *, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def vision_tower(model: Any) -> nn.Module:
    """The vision encoder of a LLaVA-family (``vision_tower``) or Qwen2-VL-family (``visual``) model."""
    inner = model.model
    tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if tower is None:
        raise ValueError(f"cannot find the vision tower of {type(model).__name__}")
    return tower


class VisionProbe(nn.Module):
    """Vision tower + a linear probe over its flattened patch tokens (so each patch must carry its content)."""

    def __init__(self, tower: nn.Module, *, num_patches: int, hidden: int, num_labels: int):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(num_patches * hidden, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]  # (B, P, D)
        return self.head(hidden.flatten(1))  # (B, labels)


def _ddp(module: nn.Module, world: int) -> nn.Module:
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)


def _step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], lr: float, clip: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def pretrain_vision(model: Any, processor: Any, rows: list[dict], labels: LabelSpace, cfg: Any, ctx: dict) -> list:
    """Phase 1: multi-label BCE on scene labels through the probe; returns the metric history."""
    tower = vision_tower(model)
    vcfg: Any = tower.config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    probe = _ddp(
        VisionProbe(tower, num_patches=num_patches, hidden=vcfg.hidden_size, num_labels=labels.size), ctx["world"]
    )
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    targets = torch.tensor([labels.encode(r) for r in rows])  # (N, labels)
    history, per_worker = [], cfg.batch_size // ctx["world"]
    batches = batch_indices(len(rows), per_worker, seed=ctx["seed"])
    for step in range(cfg.steps):
        idx = next(batches)
        pixels = processor.image_processor([rows[i]["pil"] for i in idx], return_tensors="pt")["pixel_values"]
        logits = probe(pixels.to(ctx["device"]))  # (B, labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets[idx].to(ctx["device"]))
        loss.backward()
        _step(opt, params, lr_at(step, base_lr=cfg.lr, warmup=20, total=cfg.steps), 1.0)
        acc = ((logits.detach().cpu() > 0).float() == targets[idx]).float().mean()
        history.append({"phase": "vision", "step": step, "loss": loss.item(), "label_acc": acc.item()})
        _log(ctx, history[-1], every=cfg.log_every)
    return history


def train_qa(model: Any, processor: Any, rows: list[dict], cfg: Any, ctx: dict) -> list:
    """Phase 2: next-token loss on the answers (prompt and image tokens masked), tower frozen if asked."""
    if cfg.freeze_vision:
        vision_tower(model).requires_grad_(False)
    model.train()
    wrapped = _ddp(model, ctx["world"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, per_worker = [], cfg.batch_size // ctx["world"]
    if cfg.group_by_length:
        batches = length_grouped_batches([text_length(r) for r in rows], per_worker, seed=ctx["seed"] + 1)
    else:
        batches = batch_indices(len(rows), per_worker, seed=ctx["seed"] + 1)
    for step in range(cfg.steps):
        batch_rows = [rows[i] for i in next(batches)]
        batch = encode_for_training(
            processor,
            [r["pil"] for r in batch_rows],
            [r["question"] for r in batch_rows],
            [r["answer"] for r in batch_rows],
        )
        loss = wrapped(**{k: v.to(ctx["device"]) for k, v in batch.items()}).loss
        loss.backward()
        norm = _step(opt, params, lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps), cfg.grad_clip)
        history.append({"phase": "qa", "step": step, "loss": loss.item(), "grad_norm": norm})
        _log(ctx, history[-1], every=cfg.log_every)
    model.eval()
    return history


def _log(ctx: dict, record: dict, *, every: int) -> None:
    if ctx["rank"] == 0 and (record["step"] % every == 0):
        elapsed = time.time() - ctx["t0"]
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        print(f"[sft] {shown} elapsed={elapsed:.0f}s", flush=True)


def worker_loop(payload: dict) -> None:
    """Entry point of each Ray Train worker: both phases, then rank 0 reports the model as a checkpoint."""
    import ray.train
    import ray.train.torch

    cfg, init_dir, labels = payload["cfg"], payload["init_dir"], payload["labels"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.workers.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights everywhere; DDP also broadcasts rank 0's
    device = ray.train.torch.get_device()
    ctx = {"rank": rank, "world": world, "seed": cfg.train.seed * 1000 + rank, "t0": time.time(), "device": device}
    model, processor = load_vlm(ModelConfig(path=init_dir))
    model.to(device)
    rows = load_worker_rows(payload["train_dirs"], rank=rank, world=world, max_rows=cfg.data.max_rows)
    history = []
    if cfg.vision_pretrain.steps:
        history += pretrain_vision(model, processor, rows, labels, cfg.vision_pretrain, ctx)
    history += train_qa(model, processor, rows, cfg.train, ctx)
    final = {k: v for k, v in history[-1].items() if k != "phase"}
    if rank != 0:
        ray.train.report(final)
        return
    model.to("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model", safe_serialization=True)
        processor.save_pretrained(Path(tmp) / "model")
        (Path(tmp) / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
