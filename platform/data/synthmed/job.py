"""SynthMed: a procedurally generated Med-VQA world whose answers are known exactly.

A scan (modality, organ, 0..max_findings findings; see synthmed_render) gets ``questions_per_image`` templated
questions. Question types (answer_type in brackets):

    presence    [closed] "is there a nodule?" (4 phrasings)               -> yes / no
    position    [closed] "is the mass on the left?" (2 phrasings)         -> yes / no
    modality    [closed] "is this an mri scan?"  [open] "what modality is this?" -> ct / mri / x-ray
    location    [open]   "where is the cyst?"                             -> left / right / upper / lower
    abnormality [open]   "what abnormality is seen?"            -> "nodule and mass" / "no abnormality"
    count       [open]   "how many nodules are there?"                    -> zero / one / two / three
    organ       [open]   "which organ is shown?"                          -> chest / brain / abdomen
    report      [report] "describe the image."  -> "ct of the chest showing a nodule on the left."

The language prior: in the train split a presence question is answered "yes" with probability
``prior.presence_yes_train`` (validation / test: 0.5), by asking about a present kind (yes) or an absent
one (no).
Everything is drawn from ``np.random.default_rng([seed, split_index, image_index])``, so the output does not
depend on the number of workers. Layout and examples: docs/DATA.md, "SynthMed".
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hscr_platform.core.config import to_dict
from hscr_platform.core.io import ShardWriter
from hscr_platform.data.schema import SAMPLE_SCHEMA, sample_row
from hscr_platform.data.synthmed.questions import questions_for_scene
from hscr_platform.data.synthmed.render import (
    Scene,
    contact_sheet,
    encode_png,
    render_scene,
    sample_scene,
)

SPLITS = ("train", "validation", "test")
# The instruction conversations: train-world scans (same priors as train), their own folder and seed stream, rows
# marked split "train". Appended last so the other folders' seeds are unchanged.
FOLDERS = (*SPLITS, "instruct")
PRIOR_SPLITS = ("train", "instruct")  # where the language and scene priors live


# --- configs -------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    """The language prior: share of "yes" answers in the train split (validation / test are always 0.5)."""

    presence_yes_train: float = 0.9
    position_yes_train: float = 0.5
    # Scene priors of the train world (train and instruct folders; validation / test stay uniform), for a model
    # that leans on text to name typical findings that are not there:
    usual_side_train: float = 0.0  # chance a finding sits on its kind's usual side (render.USUAL_SIDE) if free
    companion_train: float = 0.0  # chance a scan with a mass also gets an effusion (its usual companion)

    def __post_init__(self) -> None:
        for name in ("presence_yes_train", "position_yes_train", "usual_side_train", "companion_train"):
            _check_fraction(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class SplitsConfig:
    """Number of samples (rows = image-question pairs) per split."""

    train: int = 16_000
    validation: int = 1_000
    test: int = 3_000
    instruct: int = 0  # instruction conversations (folder instruct/, train world); see synthmed/instruct.py

    def __post_init__(self) -> None:
        for name in FOLDERS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.train + self.validation + self.test + self.instruct == 0:
            raise ValueError("at least one split must have samples")


@dataclass(frozen=True, kw_only=True)
class QuestionMixConfig:
    """Relative weight of each question type per question slot (normalised; see docs/DATA.md)."""

    presence: float = 0.45  # where the language prior lives, so a large share
    position: float = 0.1
    modality: float = 0.1
    location: float = 0.07
    abnormality: float = 0.08
    count: float = 0.08
    organ: float = 0.05
    report: float = 0.07

    def __post_init__(self) -> None:
        weights = {f.name: getattr(self, f.name) for f in fields(self)}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"question weights must be >= 0 with a positive sum, got {weights}")


@dataclass(frozen=True, kw_only=True)
class SynthMedConfig:
    """What to generate: the world, the questions, the prior, and how (workers, shard size)."""

    seed: int = 0
    image_size: int = 64
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    questions_per_image: int = 4
    max_findings: int = 3
    normal_fraction: float = 0.25  # share of scans without any finding
    prior: PriorConfig = field(default_factory=PriorConfig)
    question_mix: QuestionMixConfig = field(default_factory=QuestionMixConfig)
    workers: int = 2  # processes
    rows_per_shard: int = 2048

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if not 1 <= self.questions_per_image <= 8:
            raise ValueError(f"questions_per_image must be in [1, 8], got {self.questions_per_image}")
        if not 1 <= self.max_findings <= 3:  # <= 3 keeps an absent kind to ask about (4 kinds)
            raise ValueError(f"max_findings must be in [1, 3], got {self.max_findings}")
        if not 0.0 <= self.normal_fraction < 1.0:
            raise ValueError(f"normal_fraction must be in [0, 1), got {self.normal_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.rows_per_shard < self.questions_per_image:
            raise ValueError(f"rows_per_shard ({self.rows_per_shard}) must be >= questions_per_image")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    path: str
    overwrite: bool = False  # replace SynthMed's files in a non-empty folder


@dataclass(frozen=True, kw_only=True)
class SynthMedJobConfig:
    """Generate the SynthMed dataset (parquet shards per split, a preview sheet and a summary)."""

    synthmed: SynthMedConfig = field(default_factory=SynthMedConfig)
    output: OutputConfig


# --- generation ----------------------------------------------------------------------------------


def scene_at(cfg: SynthMedConfig, split: str, index: int) -> tuple[Scene, np.random.Generator]:
    """Scan ``index`` of ``split``, and the generator its questions are drawn from.

    Seeded by (seed, split, index) alone, so any worker (or a later evaluation) rebuilds exactly this scan.
    """
    rng = np.random.default_rng([cfg.seed, FOLDERS.index(split), index])
    scene_rng, question_rng = rng.spawn(2)  # questions do not depend on how the scan was drawn or rendered
    prior = cfg.prior if split in PRIOR_SPLITS else PriorConfig(usual_side_train=0.0, companion_train=0.0)
    scene = sample_scene(scene_rng, max_findings=cfg.max_findings, normal_fraction=cfg.normal_fraction,
                         usual_side=prior.usual_side_train, companion=prior.companion_train)  # fmt: skip
    return scene, question_rng


def image_samples(cfg: SynthMedConfig, split: str, index: int, count: int) -> list[dict[str, Any]]:
    """The SAMPLE_SCHEMA rows of image ``index`` of ``split``: one scan, ``count`` questions about it."""
    scene, question_rng = scene_at(cfg, split, index)
    image = encode_png(render_scene(scene, size=cfg.image_size))
    findings = [asdict(f) for f in scene.findings]
    return [
        sample_row(
            id=f"synthmed-{split}-{index:06d}-q{j}", source="synthmed", image=image,
            split="train" if split == "instruct" else split,
            question=q.question, answer=q.answer, answer_type=q.answer_type, question_type=q.question_type,
            modality=scene.modality, organ=scene.organ, findings=findings,
            meta=json.dumps({"image_index": index, "question_index": j, "normal": not scene.findings}),
        )
        for j, q in enumerate(questions_for_scene(scene, rng=question_rng, cfg=cfg, split=split, count=count))
    ]  # fmt: skip


def _chunks(cfg: SynthMedConfig, split: str) -> list[tuple[int, int]]:
    """(first image, number of images) per shard: each shard holds at most rows_per_shard rows."""
    samples = getattr(cfg.splits, split)
    images = -(-samples // cfg.questions_per_image)  # the last image may get fewer questions
    step = cfg.rows_per_shard // cfg.questions_per_image
    return [(first, min(step, images - first)) for first in range(0, images, step)]


def _generate_chunk(cfg: SynthMedConfig, split: str, shard: int, folder: str) -> Counter[str]:
    """Write one shard ``<folder>/part-<shard>.parquet``; return its tallies (what summary.json adds up)."""
    first, n_images = _chunks(cfg, split)[shard]
    samples, per_image = getattr(cfg.splits, split), cfg.questions_per_image
    tally: Counter[str] = Counter()
    with ShardWriter(folder, SAMPLE_SCHEMA, rows_per_shard=cfg.rows_per_shard, start_index=shard) as writer:
        for index in range(first, first + n_images):
            rows = image_samples(cfg, split, index, min(per_image, samples - index * per_image))
            writer.write_many(rows)
            tally["images"] += 1
            tally["normal_images"] += not rows[0]["findings"]
            for row in rows:
                tally["samples"] += 1
                tally[f"type:{row['question_type']}"] += 1
                tally[f"answer_type:{row['answer_type']}"] += 1
                tally[f"yes:{row['question_type']}"] += row["answer"] == "yes"
                tally[f"closed:{row['question_type']}"] += row["answer_type"] == "closed"
    return tally


def _run_tasks(tasks: list[tuple[SynthMedConfig, str, int, str]], workers: int) -> list[Counter[str]]:
    """Run chunk tasks in ``workers`` processes (in this process when 1), with a progress bar."""
    bar = tqdm(total=len(tasks), desc="synthmed shards", unit="shard", disable=not tasks)
    if workers == 1:
        results = []
        for task in tasks:
            results.append(_generate_chunk(*task))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_generate_chunk, *task) for task in tasks]
            for _ in as_completed(futures):
                bar.update()
            results = [f.result() for f in futures]
    bar.close()
    return results


def _split_summary(tally: Counter[str]) -> dict[str, Any]:
    """Counts, question / answer types, and the share of "yes" per closed question type (and overall)."""
    by = {p: {k.split(":")[1]: v for k, v in sorted(tally.items()) if k.startswith(p) and v}
          for p in ("type:", "answer_type:", "closed:")}  # fmt: skip
    closed, n_closed = by["closed:"], sum(by["closed:"].values())
    yes = {qtype: round(tally[f"yes:{qtype}"] / n, 4) for qtype, n in closed.items()}
    yes["all_closed"] = round(sum(tally[f"yes:{t}"] for t in closed) / max(n_closed, 1), 4)
    return {**{k: tally[k] for k in ("images", "normal_images", "samples")},
            "question_types": by["type:"], "answer_types": by["answer_type:"], "yes_rate": yes}  # fmt: skip


def generate_split(cfg: SynthMedConfig, split: str, folder: str | Path) -> dict[str, Any]:
    """Write ``split`` as parquet shards into ``folder`` (cfg.workers processes); return its summary."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tasks = [(cfg, split, shard, str(folder)) for shard in range(len(_chunks(cfg, split)))]
    return _split_summary(sum(_run_tasks(tasks, cfg.workers), Counter()))


def _prepare_output(out: OutputConfig) -> Path:
    """Refuse a non-empty folder unless overwrite; with overwrite, remove only what SynthMed writes."""
    root = Path(out.path)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output.path {root} is a file, not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.exists() else []
    if entries and not out.overwrite:
        raise ValueError(
            f"output folder {root} is not empty (holds {', '.join(entries[:5])}); "
            "choose another output.path or set output.overwrite=true to replace SynthMed's files there"
        )
    for name in (*FOLDERS, "preview.png", "summary.json"):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def generate_dataset(job: SynthMedJobConfig) -> dict[str, Any]:
    """All splits into ``<output.path>/<split>/part-NNNNN.parquet``, plus preview.png and summary.json."""
    cfg, start = job.synthmed, time.perf_counter()
    root = _prepare_output(job.output)
    tasks = []
    for split in FOLDERS:
        (root / split).mkdir()
        tasks += [(cfg, split, shard, str(root / split)) for shard in range(len(_chunks(cfg, split)))]
    tallies = _run_tasks(tasks, cfg.workers)
    per_split = {
        s: sum((t for task, t in zip(tasks, tallies, strict=True) if task[1] == s), Counter()) for s in FOLDERS
    }
    seconds = time.perf_counter() - start  # generation only; the preview is not part of the throughput
    samples = sum(t["samples"] for t in per_split.values())
    write_preview(cfg, root / "preview.png", split=next(s for s in ("test", *FOLDERS) if per_split[s]))
    summary = {
        "output": str(root), "seconds": round(seconds, 2), "workers": cfg.workers, "samples": samples,
        "samples_per_second": round(samples / seconds, 1),
        "splits": {s: _split_summary(t) for s, t in per_split.items()},
        "config": to_dict(job),
    }  # fmt: skip
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_preview(cfg: SynthMedConfig, path: str | Path, *, split: str = "test", count: int = 16) -> Path:
    """A contact sheet of the first ``count`` scans of ``split`` (same seeds as its shards), with truths."""
    scenes = [scene_at(cfg, split, index)[0] for index in range(count)]
    title = f"SynthMed {split} split, images 0-{count - 1} (seed {cfg.seed})"
    return contact_sheet(scenes, path, size=cfg.image_size, title=title)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, yes-rates, time, where the files are."""
    out = summary["output"]
    lines = [
        f"SynthMed: {summary['samples']} samples in {summary['seconds']} s "
        f"({summary['samples_per_second']}/s, {summary['workers']} workers) -> {out}"
    ]
    for split, info in summary["splits"].items():
        rates = ", ".join(f"{k} {v:.3f}" for k, v in info["yes_rate"].items())
        lines.append(f"  {split:<10} {info['samples']:>7} samples, {info['images']:>6} images; yes-rate {rates}")
    lines.append(f"  preview: {out}/preview.png  summary: {out}/summary.json")
    return "\n".join(lines)


def run(job: SynthMedJobConfig) -> dict[str, Any]:
    """The job: generate every split, print the summary."""
    summary = generate_dataset(job)
    print(format_summary(summary))
    return summary
