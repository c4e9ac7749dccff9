"""Checkpoints of the DPO worker loop: the state a checkpoint restores, restore / report / checkpoint, and the
final Hugging Face model folder (rank 0 writes it; ZeRO-3 gathers the weights first).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hscr_platform.training.policy import dtype_name, with_lora


@dataclass
class LoopState:
    """What a checkpoint restores besides the DeepSpeed state: the step (= data position) and the history."""

    step: int = 0
    done: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


# --- checkpoints, reports, the final model -----------------------------------------------------------


def restore(engine: Any, cfg: Any) -> LoopState:
    """The state of the latest checkpoint of this run (a rerun with the same name, or a worker restart)."""
    import ray.train

    from hscr_platform.training.ds_config import load_checkpoint

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return LoopState()
    with ckpt.as_directory() as folder:
        state = LoopState(**json.loads((Path(folder) / "state.json").read_text()))
        if not state.done:
            load_checkpoint(engine, folder, trainable_only=cfg.policy.lora.enabled)
    return state


def report(state: LoopState, pending: list[dict], *, rank: int, folder: str | None = None, **extra: Any) -> None:
    """Every worker reports (a barrier); rank 0's metrics carry the records since the last report."""
    import ray.train

    metrics = {"step": state.step, "done": state.done, "history": pending, **extra}
    if folder is None:
        ray.train.report(metrics)
        return
    if rank == 0:
        (Path(folder) / "state.json").write_text(json.dumps(asdict(state)))
    name = f"{'final' if state.done else 'checkpoint'}_{state.step:06d}"
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def checkpoint(engine: Any, state: LoopState, pending: list[dict], *, cfg: Any, rank: int) -> None:
    from hscr_platform.training.ds_config import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(engine, tmp, trainable_only=cfg.policy.lora.enabled)
        report(state, pending, rank=rank, folder=tmp)


def export_model(state_dict: dict[str, Any], cfg: Any, processor: Any, folder: Path) -> Path:
    """A Hugging Face folder from the trained weights: the starting model + these weights, LoRA merged
    (``model/``) or kept as a peft adapter (``adapter/``) when ``policy.lora.merge`` is false."""
    from hscr_platform.models.loading import ModelConfig, load_vlm

    model, lora = load_vlm(ModelConfig(path=cfg.policy.path, dtype=dtype_name(cfg)))[0], cfg.policy.lora
    model = with_lora(model, lora) if lora.enabled else model
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"trained weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if lora.enabled and not lora.merge:
        model.save_pretrained(folder / "adapter")
        return folder / "adapter"
    model = model.merge_and_unload() if lora.enabled else model
    model.save_pretrained(folder / "model", safe_serialization=True)
    processor.save_pretrained(folder / "model")
    return folder / "model"


def finish(engine: Any, state: LoopState, pending: list[dict], *, cfg: Any, processor: Any, rank: int) -> None:
    """Gather the weights (collective); rank 0 writes the output folder; every worker reports."""
    from hscr_platform.training.ds_config import full_state_dict

    weights = full_state_dict(engine)
    state.done = True
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            assert weights is not None
            export_model(weights, cfg, processor, Path(tmp))
            report(state, pending, rank=rank, folder=tmp)
        else:
            report(state, pending, rank=rank)
