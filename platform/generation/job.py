"""HSCR preference generation (stages 1 + 2), the job's config and driver (``python -m jobs.generate``).

    samples (parquet) -> read + validate -> score (two views) -> decode levels -> re-rank + reference logps
                      -> <output>/preferences/ (PREFERENCE_SCHEMA) + <output>/rejects/ (REJECT_SCHEMA)

The input is cut into fixed chunks (``data.chunk_rows`` rows of one shard). Ray Data streams every
chunk not yet committed through the actor pools (``generate_pipeline``); the driver commits a chunk once all
its rows are back: its preference and reject shards are written to temporary files and renamed, then the
chunk's manifest entry is written. A killed run re-run with the same output path skips committed chunks, so
every input row ends up exactly once, as a preference or a reject. A folder made by another config is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hscr_platform.core.config import load_config, to_dict
from hscr_platform.core.runtime import RayConfig, init_ray
from hscr_platform.core.tracking import TrackingConfig
from hscr_platform.generation.scoring import HscrConfig
from hscr_platform.generation.similarity import SimilarityConfig
from hscr_platform.models.loading import ModelConfig


@dataclass(frozen=True, kw_only=True)
class GenDataConfig:
    input: str  # a folder of sample shards (SAMPLE_SCHEMA), e.g. <synthmed>/train
    max_rows: int | None = None  # the first N input rows (shard order); null = all
    chunk_rows: int = 256  # rows per committed chunk: the unit of resume and of actor work
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or (self.max_rows is not None and self.max_rows < 0):
            raise ValueError("chunk_rows must be >= 1 and max_rows >= 0")


@dataclass(frozen=True, kw_only=True)
class GenModelConfig:
    """The starting model: scorer, transformers decoder and reference (the same folder)."""

    path: str | None = None  # a Hugging Face VLM folder
    from_sft_config: str | None = None  # or: the model that this SFT job config produces (<root>/sft/<hash>/model)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_tokens: int | None = None  # image + prompt + response limit; null = the model's max_position_embeddings

    def __post_init__(self) -> None:
        if (self.path is None) == (self.from_sft_config is None):
            raise ValueError("set exactly one of model.path and model.from_sft_config")


@dataclass(frozen=True, kw_only=True)
class ScorerConfig:
    """Who scores y_w under the two views: the exact transformers forward, or vLLM's prompt log-probs
    (generation/vllm_scoring.py: log-prob shift only, top-K log-probs per position, the dropout view as image
    embeddings; the engine is the decoder's, settings in ``decoder.vllm``)."""

    engine: Literal["transformers", "vllm"] = "transformers"
    top_k: int = 20  # vllm: log-probs returned per position and view (the plausible set must fit in them)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    engine: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = 64  # tokens decoded after a level's forced prefix at most
    # false = the benchmark's naive baseline: the image + prompt prefix recomputed for every level, and the
    # reference log-probs by one full forward per response instead of reusing the scoring / decoding logits
    reuse_prefix: bool = True
    # VllmConfig keys of the actor's vLLM engine (decoder and/or scorer on vllm); unset memory settings get
    # the device's default (models/engines/vllm.py: 0.9 of a GPU, a 512 MiB KV cache on CPU)
    vllm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """One Ray Data actor pool: actors, and what each reserves (fractional CPUs on small machines)."""

    actors: int = 1
    cpus: float = 0.5
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus < 0 or self.gpus < 0:
            raise ValueError("actors must be >= 1, cpus and gpus >= 0")


@dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    # fused: one actor class does score + decode + re-rank + reference (one model load; CPU default); with
    #   vLLM engines the actor holds one vLLM engine beside the transformers model (reference, re-rank).
    # split: scorer pool -> decoder pool -> finisher pool (re-rank + reference), sized apart (GPU clusters).
    # vllm: one vLLM actor pool scores and decodes (pool: compute.decoder; the image prefix cached once for
    #   the full view and every level) -> finisher pool; needs scorer.engine and decoder.engine vllm.
    layout: Literal["fused", "split", "vllm"] = "fused"
    batch_size: int = 8  # examples per forward micro-batch (all levels of these examples decode together)
    torch_threads: int = 1  # intra-op threads per actor
    read_cpus: float = 0.25  # per read + validate task
    fused: PoolConfig = field(default_factory=PoolConfig)
    scorer: PoolConfig = field(default_factory=PoolConfig)
    decoder: PoolConfig = field(default_factory=PoolConfig)
    finisher: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.torch_threads < 1:
            raise ValueError("batch_size and torch_threads must be >= 1")


@dataclass(frozen=True, kw_only=True)
class GenOutputConfig:
    path: str  # <path>/preferences/, <path>/rejects/, <path>/_manifest/, summary.json, reward_view.html


@dataclass(frozen=True, kw_only=True)
class GenRunConfig:
    stop_after_chunks: int | None = None  # stop after committing this many chunks (tests of resume)
    review_examples: int = 24  # preferences shown in reward_view.html (0 = none)
    progress_bars: bool = True  # Ray Data's progress bars (a log line per committed chunk is always printed)


@dataclass(frozen=True, kw_only=True)
class GenerateJobConfig:
    """HSCR preference generation: two-view rewards, forced-replacement levels, re-ranking, reference."""

    data: GenDataConfig
    model: GenModelConfig
    output: GenOutputConfig
    hscr: HscrConfig = field(default_factory=HscrConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    run: GenRunConfig = field(default_factory=GenRunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # store: <output.path>/../mlflow.db

    def __post_init__(self) -> None:
        engines = {self.scorer.engine, self.decoder.engine}
        if self.compute.layout == "vllm" and engines != {"vllm"}:
            raise ValueError(
                "compute.layout 'vllm' scores and decodes in one vLLM actor pool: set scorer.engine=vllm and "
                "decoder.engine=vllm (or compute.layout=fused / split for a transformers engine)"
            )
        if self.scorer.engine == "vllm":
            from hscr_platform.generation.vllm_scoring import LOGIT_SHIFT_REFUSED

            if getattr(self.hscr, "shift", "logprob") != "logprob":
                raise ValueError(LOGIT_SHIFT_REFUSED)
        if "vllm" in engines:  # its keys fail at load time, not in an actor hours later
            from hscr_platform.core.config import from_dict
            from hscr_platform.models.engines.vllm import VllmConfig

            from_dict(VllmConfig, self.decoder.vllm, where="decoder.vllm")


def result_config(cfg: GenerateJobConfig) -> dict[str, Any]:
    """The part of the config that decides the output rows (not paths, pool sizes, progress or stop knobs)."""
    full = to_dict(cfg)
    result = {key: full[key] for key in ("data", "model", "hscr", "similarity", "scorer", "decoder")}
    result["batch_size"] = cfg.compute.batch_size  # padding within a micro-batch moves floats slightly
    return result


def generation_hash(cfg: GenerateJobConfig) -> str:
    """``config_hash`` stored in every preference row; a resumed run must have the same one."""
    text = json.dumps(result_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_model_dir(cfg: GenModelConfig) -> Path:
    """The model folder: ``model.path``, or the ``model/`` of the SFT run the given SFT config produces."""
    if cfg.path is not None:
        return Path(cfg.path)
    from hscr_platform.core.cache import stage_dir
    from hscr_platform.training.sft import SftJobConfig

    sft = load_config(SftJobConfig, cfg.from_sft_config)
    folder = stage_dir(sft.output.root, "sft", sft) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"model.from_sft_config: {folder} does not exist yet; run jobs.sft with that config")
    return folder


def model_config(cfg: GenModelConfig, folder: Path) -> ModelConfig:
    return ModelConfig(path=str(folder), dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)


# --- driver -----------------------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the console: counts, reject reasons, level histogram, where the data is."""
    lines = [
        f"[generate] {summary['status']}: {summary['rows']} rows -> {summary['preferences']} preferences, "
        f"{summary['rejects']} rejects ({summary['chunks_committed']}/{summary['chunks']} chunks) "
        f"in {summary['seconds']:.1f}s",
        f"  rejects by reason: {summary['reject_reasons']}",
        f"  num_levels histogram: {summary['num_levels']}  replaced tokens (m): {summary['level_m']}",
        f"  output: {summary['output']}",
    ]
    return "\n".join(lines)


def _commit_stream(ds: Any, plan: Any, todo: list[int], out: Path, cfg: GenerateJobConfig) -> bool:
    """Gather rows per chunk as they stream back, commit each complete chunk; True if stopped early."""
    from hscr_platform.generation.graph import commit_chunk, unpack

    expected = {i: plan.chunks[i].stop - plan.chunks[i].start for i in todo}
    pending: dict[int, list[dict]] = {i: [] for i in todo}
    t0, rows_done, committed = time.time(), 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for state in unpack(batch):
            index = state["chunk"]
            pending[index].append(state)
            if len(pending[index]) < expected[index]:
                continue
            entry = commit_chunk(out, index, pending.pop(index))
            committed, rows_done = committed + 1, rows_done + entry["rows"]
            rate = rows_done / max(time.time() - t0, 1e-9)
            print(
                f"[generate] chunk {index:05d} committed ({committed}/{len(todo)} this run): "
                f"{entry['preferences']} preferences, {entry['rejects']} rejects | {rows_done} rows, "
                f"{rate:.2f} examples/s",
                flush=True,
            )
            if cfg.run.stop_after_chunks is not None and committed >= cfg.run.stop_after_chunks:
                return True
    if pending:
        raise RuntimeError(f"the pipeline ended with chunks incomplete: {sorted(pending)[:10]}")
    return False


def _generate(cfg: GenerateJobConfig, plan: Any, todo: list[int], *, model_dir: Path, out: Path) -> bool:
    """Run the Ray Data pipeline over the chunks not committed yet (a Ray started here is shut down after)."""
    import ray

    from hscr_platform.generation.graph import build_dataset
    from hscr_platform.generation.worker import WorkerSpec
    from hscr_platform.models.logprobs import model_fingerprint

    started = not ray.is_initialized()
    init_ray(cfg.ray)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = cfg.run.progress_bars
        fingerprint = model_fingerprint(model_dir, dtype=cfg.model.dtype)  # the workers load it in this dtype
        spec = WorkerSpec(cfg, str(model_dir.resolve()), fingerprint, generation_hash(cfg))
        return _commit_stream(build_dataset(cfg, plan, todo, spec), plan, todo, out, cfg)
    finally:
        if started:
            ray.shutdown()


def _track(cfg: GenerateJobConfig, out: Path, summary: dict[str, Any]) -> None:
    """Log the run (config, counts, reward view, summary) to MLflow when tracking is enabled."""
    if not cfg.tracking.enabled:
        return
    from hscr_platform.core import tracking

    where = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:6]  # a rerun of this folder re-attaches
    run = tracking.start_run(
        uri=tracking.tracking_uri(cfg.tracking, out.resolve().parent),
        experiment=cfg.tracking.experiment,
        run_name=f"generate-{generation_hash(cfg)}-{where}",
    )
    tracking.log_config(run, cfg)
    metrics = [{"step": 0, **{k: summary[k] for k in ("rows", "preferences", "rejects", "examples_per_s")}}]
    tracking.log_metrics_history(run, metrics, key="rows")
    for name in ("reward_view.html", "summary.json"):
        if (out / name).is_file():
            tracking.log_artifacts(run, out / name)
    tracking.end_run(run)


def run(cfg: GenerateJobConfig) -> dict[str, Any]:
    """Generate (or finish generating) the preference data; returns the summary."""
    from hscr_platform.generation.graph import open_output, summarize
    from hscr_platform.generation.plan import plan_chunks
    from hscr_platform.generation.reward_view import write_reward_view
    from hscr_platform.models.loading import check_vlm_folder

    t0 = time.time()
    model_dir = check_vlm_folder(resolve_model_dir(cfg.model))  # a bad folder fails here, before Ray starts
    out = Path(cfg.output.path)
    plan = plan_chunks(cfg.data)
    committed = open_output(out, cfg, plan)
    todo = [chunk.index for chunk in plan.chunks if chunk.index not in committed]
    print(
        f"[generate] {plan.rows} rows in {len(plan.chunks)} chunks; {len(committed)} already committed, "
        f"{len(todo)} to do -> {out}",
        flush=True,
    )
    stopped = _generate(cfg, plan, todo, model_dir=model_dir, out=out) if todo else False
    summary = summarize(out, plan, status="stopped" if stopped else "done", seconds=time.time() - t0, earlier=committed)
    if not stopped:
        write_reward_view(out / "preferences", model_dir, out / "reward_view.html", examples=cfg.run.review_examples)
        _track(cfg, out, summary)
    print(format_summary(summary), flush=True)
    return summary
