"""Supervised fine-tuning job: the base Med-VLM that HSCR later aligns (``python -m jobs.sft``).

With ``init.kind: toy`` it builds the toy Med-VLM (tokenizer trained on the training text) and trains it on
SynthMed's skewed training split on Ray Train; with ``init.kind: pretrained`` it fine-tunes an existing Hugging
Face VLM folder. Outputs live in ``<output.root>/sft/<config hash>/`` and are reused when the config is the same:
``model/`` (a Hugging Face folder), ``metrics.jsonl``, ``curves.png``, ``eval.json``, ``config.yaml``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.core.cache import is_complete, mark_complete, read_summary, reset, stage_dir
from hscr_platform.core.config import config_hash
from hscr_platform.core.io import iter_rows, shard_files
from hscr_platform.core.runtime import RayConfig, init_ray
from hscr_platform.models.loading import check_vlm_folder
from hscr_platform.models.toy import ToyModelConfig, create_toy_model


@dataclass(frozen=True, kw_only=True)
class SftDataConfig:
    train: str  # folder of sample shards (common schema) to train on, e.g. <synthmed>/train
    eval: str | None = None  # folder of sample shards to evaluate on after training (e.g. <synthmed>/test)
    max_rows: int | None = None  # cap on training rows of data.train (None = all)
    instruct: str | None = None  # a folder of instruction conversations trained on too (SynthMed's instruct/)

    def folders(self) -> list[str]:
        """Every folder trained on, data.train first."""
        return [self.train] + ([self.instruct] if self.instruct else [])


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    kind: Literal["toy", "pretrained"] = "toy"
    toy: ToyModelConfig = field(default_factory=ToyModelConfig)
    pretrained: str | None = None  # a local Hugging Face VLM folder, when kind is "pretrained"

    def __post_init__(self) -> None:
        if self.kind == "pretrained" and not self.pretrained:
            raise ValueError("init.kind is 'pretrained' but init.pretrained (a model folder) is not set")


@dataclass(frozen=True, kw_only=True)
class VisionPretrainConfig:
    steps: int = 600  # 0 skips the phase (needs scene labels: SynthMed only)
    lr: float = 2e-3
    batch_size: int = 64  # global
    log_every: int = 100


@dataclass(frozen=True, kw_only=True)
class SftTrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 64  # global, split evenly over the workers
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    freeze_vision: bool = True
    # batches of rows of similar length (less padding: SynthMed's VQA and instruction rows differ ~2x in text);
    # false: plain random batches
    group_by_length: bool = True
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False


@dataclass(frozen=True, kw_only=True)
class SftEvalConfig:
    samples: int = 1000  # rows of data.eval to answer (0 = skip)
    batch_size: int = 64
    max_new_tokens: int = 24


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    root: str = "runs"  # stage folders go to <root>/sft/<config hash>/


@dataclass(frozen=True, kw_only=True)
class SftJobConfig:
    """Supervised fine-tuning of the base Med-VLM on Ray Train."""

    data: SftDataConfig
    init: InitConfig = field(default_factory=InitConfig)
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    eval: SftEvalConfig = field(default_factory=SftEvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        for name, batch in (("train", self.train.batch_size), ("vision_pretrain", self.vision_pretrain.batch_size)):
            if batch % self.workers.num_workers:
                raise ValueError(f"{name}.batch_size {batch} is not divisible by workers.num_workers")


def _corpus(folder: str) -> list[str]:
    """The text the toy tokenizer is trained on: every question and answer of the training data."""
    return [t for row in iter_rows(folder, columns=["question", "answer"]) for t in (row["question"], row["answer"])]


def _corpora(folders: list[str]) -> list[str]:
    return [text for folder in folders for text in _corpus(folder)]


def _initial_model(cfg: SftJobConfig, out: Path) -> Path:
    if cfg.init.kind == "pretrained":
        return check_vlm_folder(str(cfg.init.pretrained))
    return create_toy_model(cfg.init.toy, _corpora(cfg.data.folders()), out / "init")


def _fit(cfg: SftJobConfig, init_dir: Path, out: Path) -> Path:
    """Run both phases on Ray Train; returns the folder of the final checkpoint (model/ + metrics.jsonl)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hscr_platform.training.sft_loop import label_space_of, worker_loop

    labels = label_space_of(cfg.data.train) if cfg.vision_pretrain.steps else None
    trainer = TorchTrainer(
        worker_loop,
        # workers run in their own working directory: hand them absolute paths
        train_loop_config={
            "cfg": cfg,
            "init_dir": str(init_dir.resolve()),
            "train_dirs": [str(Path(folder).resolve()) for folder in cfg.data.folders()],
            "labels": labels,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers.num_workers,
            use_gpu=cfg.workers.use_gpu,
            resources_per_worker={"CPU": cfg.workers.cpus_per_worker},
        ),
        run_config=RunConfig(name=f"sft-{config_hash(cfg)}", storage_path=str((out / "ray").resolve())),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("SFT finished without a checkpoint")
    return Path(result.checkpoint.to_directory(str(out / "checkpoint")))


def run(cfg: SftJobConfig) -> dict[str, Any]:
    """Train (or reuse) the base model; returns the summary (paths, timings, evaluation)."""
    if not shard_files(cfg.data.train):
        raise FileNotFoundError(f"data.train: no sample shards (part-*.parquet) in {cfg.data.train}")
    if cfg.data.instruct and not shard_files(cfg.data.instruct):
        raise FileNotFoundError(f"data.instruct: no sample shards (part-*.parquet) in {cfg.data.instruct}")
    out = stage_dir(cfg.output.root, "sft", cfg)
    if is_complete(out):
        print(f"[sft] cached: {out}/model (same config {config_hash(cfg)})")
        return read_summary(out)
    reset(out)
    t0 = time.time()
    init_dir = _initial_model(cfg, out)
    init_ray(cfg.ray)
    ckpt = _fit(cfg, init_dir, out)
    shutil.move(str(ckpt / "model"), out / "model")
    shutil.move(str(ckpt / "metrics.jsonl"), out / "metrics.jsonl")
    shutil.rmtree(ckpt, ignore_errors=True)
    train_s = time.time() - t0
    from hscr_platform.core.plots import plot_training_curves

    plot_training_curves(out / "metrics.jsonl", out / "curves.png")
    summary: dict[str, Any] = {"model": str(out / "model"), "train_seconds": round(train_s, 1)}
    if cfg.data.eval and cfg.eval.samples:
        from hscr_platform.models.answering import evaluate_folder

        report = evaluate_folder(
            out / "model",
            cfg.data.eval,
            samples=cfg.eval.samples,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        summary["eval"] = report["metrics"]
    mark_complete(out, cfg, **summary)
    print(f"[sft] done in {train_s:.0f}s: {out}/model")
    return summary
