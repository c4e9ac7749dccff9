"""Benchmark of preference generation (``python -m jobs.benchmark generate``): what each reuse buys, alone and
together, at the toy shape and at LLaVA-Med's shape.

Every variant runs the same stages with the same model, batching and engine, in this process (no Ray, so the
numbers are the engine's own): read + validate -> two-view scoring -> decoding the levels -> re-ranking +
reference log-probs -> write a parquet shard. They differ only in what is recomputed:

    variant          image + prompt prefix                  reference log-probs
    baseline         encoded again for every level decoded  one full forward per response (image re-encoded)
    prefix_only      encoded once per example, KV reused    a separate pass, prefix shared (shared_prefix_logps)
    reference_only   encoded again for every level decoded  read from the logits already computed (y_w's from
                                                            the full-view scoring pass, each level's from its
                                                            decoding pass: the decoding model is the reference)
    optimised        encoded once per example               read from those logits (the pipeline's default)

One :class:`Worker` per shape serves all four: the job has one switch (``decoder.reuse_prefix``) for both
reuses, so the benchmark sets the decoder's prefix switch and the worker's reference switch separately per
stage (:func:`_set_variant`). Shapes: ``toy`` = the demo's base model (or an untrained toy of its size) on
SynthMed, 64 image tokens, short answers; ``llava`` = an untrained model with 576 image tokens (192 px, patch 8)
on SynthMed instruction answers of 30–100 tokens (a small-vocabulary tokenizer), k = 3 levels. Each variant
runs ``repeats`` passes (variants alternate); reported: median / min / max examples/s, and speedups as ratios
of medians. Outputs of all variants must be the same tokens (``same_outputs``).

    python -m jobs.benchmark generate --output runs/bench examples=64 repeats=5
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.bench.common import PeakRss, ratio, spread
from hscr_platform.models.toy import ToyModelConfig

DEMO_PIPELINE = "jobs/configs/pipeline/demo.yaml"
VARIANTS = {"baseline": (False, False), "prefix_only": (True, False), "reference_only": (False, True),
            "optimised": (True, True)}  # name -> (reuse prefix, reuse reference)  # fmt: skip


def _llava_model() -> ToyModelConfig:
    """576 image tokens like LLaVA-1.5's CLIP-L/336; the text model as large as 2 CPU cores allow in a few s."""
    return ToyModelConfig(vocab_size=96, image_size=192, patch_size=8, vision_hidden=128, vision_layers=2,
                          vision_heads=4, text_hidden=384, text_layers=6, text_heads=6, text_intermediate=1024,
                          max_positions=1024)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LlavaShape:
    """The LLaVA-Med-shaped configuration."""

    enabled: bool = True
    examples: int = 8
    batch_size: int = 4
    min_answer_tokens: int = 30
    max_answer_tokens: int = 100
    max_new_tokens: int = 24  # after each level's forced prefix (an untrained model rarely stops by itself)
    candidate_levels: int = 4  # hscr.levels decoded per example, k = 3 kept
    model: ToyModelConfig = field(default_factory=_llava_model)


@dataclass(frozen=True, kw_only=True)
class GenerateBenchConfig:
    """The generation benchmark (``python -m jobs.benchmark generate key=value ...``)."""

    examples: int = 64  # toy shape: input rows per pass
    batch_size: int = 16  # examples per micro-batch (compute.batch_size)
    threads: int = 2  # torch intra-op threads
    max_new_tokens: int = 32
    similarity: Literal["embedding", "lexical"] = "embedding"
    repeats: int = 5  # timed passes per variant, variants alternating
    question_types: tuple[str, ...] = ()  # toy shape: only these SynthMed question types; empty = all
    llava: LlavaShape = field(default_factory=LlavaShape)


# --- data and models ---------------------------------------------------------------------------------------


def _demo_paths() -> tuple[Path, Path] | None:
    """(base model folder, training samples) of ``make demo`` (jobs/configs/pipeline/demo.yaml) if trained."""
    from hscr_platform.core.cache import stage_dir
    from hscr_platform.core.config import load_config
    from hscr_platform.pipeline import PipelineConfig, plan

    stages = plan(load_config(PipelineConfig, DEMO_PIPELINE))
    model = stage_dir(stages.sft.output.root, "sft", stages.sft) / "model"
    data = stages.synthmed_dir / "train"
    return (model, data) if model.is_dir() and data.is_dir() else None


def _synthmed(folder: Path, *, train: int = 0, instruct: int = 0) -> Path:
    from hscr_platform.core.config import load_config
    from hscr_platform.data.synthmed.job import SynthMedJobConfig, generate_dataset

    overrides = [f"output.path={folder}", f"synthmed.splits.train={train}", "synthmed.splits.validation=0",
                 "synthmed.splits.test=0", f"synthmed.splits.instruct={instruct}"]  # fmt: skip
    generate_dataset(load_config(SynthMedJobConfig, "jobs/configs/synthmed/tiny.yaml", overrides))
    return folder


def _toy_inputs(tmp: Path, rows: int) -> tuple[Path, Path, str]:
    """The demo's trained base model and SynthMed data, else an untrained toy of that size on fresh data."""
    found = _demo_paths()
    if found is not None:
        return found[0], found[1], "demo base model"
    from hscr_platform.data.synthmed.render import KINDS
    from hscr_platform.models.toy import create_toy_model

    data = _synthmed(tmp / "synthmed", train=rows) / "train"
    texts = [f"is there a {k}? yes no left right upper lower ct mri x-ray chest brain" for k in KINDS] * 20
    model = create_toy_model(ToyModelConfig(), texts, tmp / "toy")
    return model, data, "untrained toy model (demo size; the demo is not trained yet)"


def _llava_inputs(tmp: Path, shape: LlavaShape) -> tuple[Path, Path, str]:
    """An untrained 576-image-token model and SynthMed instruction rows whose answers have 30–100 tokens."""
    from hscr_platform.core.io import ShardWriter, iter_rows
    from hscr_platform.data.schema import SAMPLE_SCHEMA
    from hscr_platform.models.loading import ModelConfig, load_vlm
    from hscr_platform.models.toy import create_toy_model

    data = _synthmed(tmp / "synthmed-instruct", instruct=max(64, 8 * shape.examples)) / "instruct"
    texts = [r["answer"] for r in iter_rows(data, columns=["answer"])][:200]
    model = create_toy_model(shape.model, texts, tmp / "llava-shaped")
    tokenizer = load_vlm(ModelConfig(path=str(model)))[1].tokenizer
    kept = 0
    with ShardWriter(tmp / "llava-rows", SAMPLE_SCHEMA, rows_per_shard=shape.examples) as writer:
        for row in iter_rows(data):
            n = len(tokenizer(row["answer"])["input_ids"])
            if shape.min_answer_tokens <= n <= shape.max_answer_tokens and kept < shape.examples:
                writer.write(row)
                kept += 1
    if kept < shape.examples:
        raise RuntimeError(f"only {kept} instruction answers of {shape.min_answer_tokens}-{shape.max_answer_tokens} "
                           "tokens: raise llava.max_answer_tokens or lower llava.examples")  # fmt: skip
    return model, tmp / "llava-rows", f"untrained LLaVA-shaped model ({shape.model.num_image_tokens} image tokens)"


def _filtered(samples: Path, question_types: tuple[str, ...], rows: int, tmp: Path) -> Path:
    """The first ``rows`` samples of the given question types, as a new sample folder."""
    from hscr_platform.core.io import ShardWriter, iter_rows
    from hscr_platform.data.schema import SAMPLE_SCHEMA

    kept = 0
    with ShardWriter(tmp / "filtered", SAMPLE_SCHEMA, rows_per_shard=rows) as writer:
        for row in iter_rows(samples):
            if row["question_type"] in question_types and kept < rows:
                writer.write(row)
                kept += 1
    return tmp / "filtered"


def _config(samples: Path, model_dir: Path, *, reuse: bool, examples: int, batch_size: int, threads: int,
            max_new_tokens: int, similarity: str, extra: tuple[str, ...] = ()) -> Any:  # fmt: skip
    from hscr_platform.core.config import load_config
    from hscr_platform.generation.job import GenerateJobConfig

    return load_config(GenerateJobConfig, "jobs/configs/generate/demo.yaml", [
        f"data.input={samples}", f"data.max_rows={examples}", f"data.chunk_rows={examples}",
        "model.from_sft_config=null", f"model.path={model_dir}", f"decoder.reuse_prefix={str(reuse).lower()}",
        f"decoder.max_new_tokens={max_new_tokens}", f"compute.batch_size={batch_size}",
        f"compute.torch_threads={threads}", f"similarity.kind={similarity}", "output.path=unused", *extra,
    ])  # fmt: skip


# --- one shape: a worker, four variants ----------------------------------------------------------------------


def _count_tokens(model: Any) -> Counter[str]:
    """A counter of token positions fed to the language model (every forward, padding included)."""
    counter: Counter[str] = Counter()

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        if embeds is not None:
            counter["tokens"] += int(embeds.shape[0] * embeds.shape[1])

    model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


class Shape:
    """One worker (models loaded once, untimed), its input rows, and a timed pass per variant."""

    def __init__(self, configs: dict[bool, Any], model_dir: Path):
        from hscr_platform.generation.plan import plan_chunks
        from hscr_platform.generation.worker import Worker, WorkerSpec

        self.configs = configs  # reuse flag -> the job config with decoder.reuse_prefix set to it
        self.worker = Worker(WorkerSpec(configs[True], str(model_dir), "bench", "bench"),
                             parts=("score", "decode", "finish"))  # fmt: skip
        self.tokens = _count_tokens(self.worker.model)
        self.plan = plan_chunks(configs[True].data)
        warm = self._read()[: configs[True].compute.batch_size]  # first calls (allocator, pools) not timed
        for name in VARIANTS:
            self._stages(warm, name)

    def _read(self) -> list[dict]:
        import pyarrow as pa

        from hscr_platform.generation.graph import read_chunk_batch, unpack
        from hscr_platform.generation.plan import chunk_descriptor

        descriptors = pa.Table.from_pylist([chunk_descriptor(c) for c in self.plan.chunks])
        return unpack(read_chunk_batch(descriptors, data=self.configs[True].data))

    def _set_variant(self, name: str, stage: str) -> None:
        """Prefix reuse lives in the decoder (levels) and in the reference pass (finish); reference reuse in
        what scoring and decoding keep. The job's one switch covers both, so set them per stage here."""
        prefix, reference = VARIANTS[name]
        self.worker.decoder.reuse_prefix = prefix
        self.worker.cfg = self.configs[prefix if stage == "finish" else reference]

    def _stages(self, states: list[dict], name: str) -> None:
        for stage in ("score", "decode", "finish"):
            self._set_variant(name, stage)
            self.worker.run(states, stage)

    def measure(self, name: str, out: Path) -> dict[str, Any]:
        """One timed pass of variant ``name`` over every example: read, the three stages, write."""
        from hscr_platform.generation.graph import commit_chunk

        self.worker.timings.clear()
        self.tokens.clear()
        timings: dict[str, float] = defaultdict(float)
        with PeakRss() as memory:
            t0 = time.perf_counter()
            states = self._read()
            timings["io"] += time.perf_counter() - t0
            self._stages(states, name)
            t0 = time.perf_counter()
            entry = commit_chunk(out, 0, states)
            timings["io"] += time.perf_counter() - t0
        for stage, seconds in self.worker.timings.items():
            timings[stage] += seconds
        total = sum(timings.values())
        outputs = [s.get("preference", {}).get("response_token_ids") for s in sorted(states, key=lambda s: s["row"])]
        return {"seconds": total, "examples_per_s": self.plan.rows / total, "preferences": entry["preferences"],
                "rejects": entry["rejects"], "reject_reasons": entry["reject_reasons"],
                "forward_tokens_per_example": round(self.tokens["tokens"] / self.plan.rows, 1),
                "peak_rss_mib": round(memory.peak, 1), "stage_seconds": dict(timings), "_outputs": outputs}  # fmt: skip


KEPT_AS_IS = ("preferences", "rejects", "reject_reasons", "forward_tokens_per_example")  # the same every pass


def _summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    first = passes[0]
    stages = {k: spread([p["stage_seconds"].get(k, 0.0) for p in passes]) for k in first["stage_seconds"]}
    return {"examples_per_s": spread([p["examples_per_s"] for p in passes]),
            "seconds": spread([p["seconds"] for p in passes]), "stage_seconds": stages,
            "peak_rss_mib": max(p["peak_rss_mib"] for p in passes),
            **{k: first[k] for k in KEPT_AS_IS}}  # fmt: skip


def bench_shape(shape: Shape, *, repeats: int, tmp: Path) -> dict[str, Any]:
    """Every variant ``repeats`` times (alternating); medians, spreads, speedups over the baseline."""
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(repeats):
        for name in VARIANTS:
            runs[name].append(shape.measure(name, tmp / f"{name}-{r}"))
    outputs = {name: runs[name][0].pop("_outputs") for name in VARIANTS}
    for passes in runs.values():
        for p in passes:
            p.pop("_outputs", None)
    out: dict[str, Any] = {"examples": shape.plan.rows, "repeats": repeats}
    out.update({name: _summary(passes) for name, passes in runs.items()})
    base = out["baseline"]["examples_per_s"]
    for name in ("optimised", "prefix_only", "reference_only"):
        out[f"speedup_{name}"] = ratio(out[name]["examples_per_s"], base)
    out["same_outputs"] = all(o == outputs["baseline"] for o in outputs.values())
    return out


def _toy_shape(cfg: GenerateBenchConfig, tmp: Path) -> tuple[Shape, str]:
    model_dir, samples, kind = _toy_inputs(tmp, cfg.examples)
    if cfg.question_types:  # e.g. ("report",): long answers, many levels per example
        samples = _filtered(samples, cfg.question_types, cfg.examples, tmp)
    configs = {reuse: _config(samples, model_dir, reuse=reuse, examples=cfg.examples, batch_size=cfg.batch_size,
                              threads=cfg.threads, max_new_tokens=cfg.max_new_tokens, similarity=cfg.similarity)
               for reuse in (False, True)}  # fmt: skip
    return Shape(configs, model_dir), kind


def _llava_shape(cfg: GenerateBenchConfig, tmp: Path) -> tuple[Shape, str]:
    shape = cfg.llava
    model_dir, samples, kind = _llava_inputs(tmp, shape)
    extra = (f"hscr.levels={shape.candidate_levels}", "hscr.k=3", "hscr.alpha=0.001")
    configs = {reuse: _config(samples, model_dir, reuse=reuse, examples=shape.examples, batch_size=shape.batch_size,
                              threads=cfg.threads, max_new_tokens=shape.max_new_tokens, similarity=cfg.similarity,
                              extra=extra) for reuse in (False, True)}  # fmt: skip
    return Shape(configs, model_dir), kind


def run(cfg: GenerateBenchConfig) -> dict[str, Any]:
    """The benchmark JSON: ``speedup`` (toy shape, prefix + reference reuse over the naive path), the two
    ablations, and the same at LLaVA-Med's shape (``llava_*``)."""
    import torch

    if cfg.repeats < 1:
        raise ValueError("repeats must be >= 1 (the issue asks for at least 5)")
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        toy, toy_kind = _toy_shape(cfg, tmp)
        toy_result = {"model": toy_kind, **bench_shape(toy, repeats=cfg.repeats, tmp=tmp / "toy")}
        del toy
        llava_result: dict[str, Any] | None = None
        if cfg.llava.enabled:
            llava, llava_kind = _llava_shape(cfg, tmp)
            llava_result = {"model": llava_kind, **bench_shape(llava, repeats=cfg.repeats, tmp=tmp / "llava")}
    result: dict[str, Any] = {
        "benchmark": "generate",
        "speedup": toy_result["speedup_optimised"],
        "speedup_prefix_only": toy_result["speedup_prefix_only"],
        "speedup_reference_only": toy_result["speedup_reference_only"],
        "examples_per_s": toy_result["optimised"]["examples_per_s"],
        "baseline_examples_per_s": toy_result["baseline"]["examples_per_s"],
    }
    if llava_result is not None:
        result.update({
            "llava_speedup": llava_result["speedup_optimised"],
            "llava_speedup_prefix_only": llava_result["speedup_prefix_only"],
            "llava_speedup_reference_only": llava_result["speedup_reference_only"],
        })  # fmt: skip
    result.update({"toy": toy_result, "llava": llava_result,
                   "machine": {"torch_threads": cfg.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                               "load_avg_1m": round(os.getloadavg()[0], 2)},
                   "config": dataclasses.asdict(cfg)})  # fmt: skip
    return result
