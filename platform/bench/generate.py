"""Benchmark of preference generation: prefix reuse against the naive per-level baseline (``jobs.benchmark``).

Both variants run the same stages with the same model, batching and engine, in this process (no Ray, so
the numbers are the engine's own): read + validate -> two-view scoring -> decoding the levels -> re-ranking +
reference log-probs -> write a parquet shard. They differ only in what is recomputed. The baseline
(``decoder.reuse_prefix=false``) encodes the image + prompt again for every level it decodes and takes the
reference log-probs with one full forward per response. The optimised one encodes the prefix once per example
and reuses its KV cache for all levels, and takes the reference log-probs from the logits it already computed
(y_w's from the full-view scoring pass, each level's from its decoding pass: the decoding model is the
reference). Reported per variant: examples/s, language-model forward tokens per example (padding included),
peak RSS (and its rise during the pass), and the share of time per stage (score / decode / rerank /
reference / io); ``speedup`` = optimised examples/s over baseline examples/s. Model and data: ``make
demo``'s trained base model and SynthMed training split when they exist (else an untrained toy of the same
size on fresh SynthMed rows, said in ``model``).

    python -m jobs.benchmark generate --output runs/bench examples=256   # -> runs/bench/generate.json
    run_generate_benchmark("runs/bench", examples=64)                     # the same, from Python
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

DEMO_PIPELINE = "jobs/configs/pipeline/demo.yaml"


@dataclass(frozen=True, kw_only=True)
class GenerateBenchConfig:
    """The generation benchmark (``python -m jobs.benchmark generate key=value ...``)."""

    examples: int = 256  # input rows per pass
    batch_size: int = 16  # examples per micro-batch (compute.batch_size)
    threads: int = 2  # torch intra-op threads
    max_new_tokens: int = 32
    similarity: Literal["embedding", "lexical"] = "embedding"
    repeats: int = 3  # timed passes per variant, alternating; the fastest of each is reported
    question_types: tuple[str, ...] = ()  # only these SynthMed question types (e.g. [report]); empty = all


def run(cfg: GenerateBenchConfig) -> dict[str, Any]:
    """Entry point of ``jobs.benchmark`` (which writes the JSON)."""
    return run_generate_benchmark(None, **asdict(cfg))


class PeakRss:
    """Peak resident memory of this process while the context is open (sampled every 5 ms), in MiB."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())


def _demo_paths() -> tuple[Path, Path] | None:
    """(base model folder, training samples) of ``make demo`` (jobs/configs/pipeline/demo.yaml) if trained."""
    from hscr_platform.core.cache import stage_dir
    from hscr_platform.core.config import load_config
    from hscr_platform.pipeline import PipelineConfig, plan

    stages = plan(load_config(PipelineConfig, DEMO_PIPELINE))
    model = stage_dir(stages.sft.output.root, "sft", stages.sft) / "model"
    data = stages.synthmed_dir / "train"
    return (model, data) if model.is_dir() and data.is_dir() else None


def _model_and_samples(tmp: Path, rows: int) -> tuple[Path, Path, str]:
    """The demo's trained base model and SynthMed data, else an untrained toy of that size on fresh data."""
    found = _demo_paths()
    if found is not None:
        return found[0], found[1], "demo base model"
    from hscr_platform.core.config import load_config
    from hscr_platform.data.synthmed.job import SynthMedJobConfig, generate_dataset
    from hscr_platform.data.synthmed.render import KINDS
    from hscr_platform.models.toy import ToyModelConfig, create_toy_model

    overrides = [f"output.path={tmp / 'synthmed'}", f"synthmed.splits.train={rows}"]
    overrides += ["synthmed.splits.validation=0", "synthmed.splits.test=0"]
    generate_dataset(load_config(SynthMedJobConfig, "jobs/configs/synthmed/tiny.yaml", overrides))
    texts = [f"is there a {k}? yes no left right upper lower ct mri x-ray chest brain" for k in KINDS] * 20
    model = create_toy_model(ToyModelConfig(), texts, tmp / "toy")
    return model, tmp / "synthmed" / "train", "untrained toy model (demo size; the demo is not trained yet)"


def _filtered(samples: Path, question_types: tuple[str, ...], rows: int, tmp: Path) -> Path:
    """The first ``rows`` samples of the given question types, as a new sample folder."""
    from hscr_platform.core.io import ShardWriter, iter_rows
    from hscr_platform.data.schema import SAMPLE_SCHEMA

    folder = tmp / "filtered"
    kept = 0
    with ShardWriter(folder, SAMPLE_SCHEMA, rows_per_shard=rows) as writer:
        for row in iter_rows(samples):
            if row["question_type"] in question_types and kept < rows:
                writer.write(row)
                kept += 1
    return folder


def _config(
    samples: Path,
    model_dir: Path,
    *,
    reuse: bool,
    examples: int,
    batch_size: int,
    threads: int,
    max_new_tokens: int,
    similarity: str,
) -> Any:
    from hscr_platform.core.config import load_config
    from hscr_platform.generation.job import GenerateJobConfig

    return load_config(
        GenerateJobConfig,
        "jobs/configs/generate/demo.yaml",
        [
            f"data.input={samples}",
            f"data.max_rows={examples}",
            f"data.chunk_rows={examples}",
            "model.from_sft_config=null",
            f"model.path={model_dir}",
            f"decoder.reuse_prefix={str(reuse).lower()}",
            f"decoder.max_new_tokens={max_new_tokens}",
            f"compute.batch_size={batch_size}",
            f"compute.torch_threads={threads}",
            f"similarity.kind={similarity}",
            "output.path=unused",
        ],
    )


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


class Variant:
    """One side of the comparison: its own Worker (models loaded once, untimed) and a warm-up micro-batch."""

    def __init__(self, cfg: Any, model_dir: Path):
        from hscr_platform.generation.graph import plan_chunks
        from hscr_platform.generation.worker import Worker, WorkerSpec

        self.cfg = cfg
        self.worker = Worker(WorkerSpec(cfg, str(model_dir), "bench", "bench"), parts=("score", "decode", "finish"))
        self.tokens = _count_tokens(self.worker.model)
        self.plan = plan_chunks(cfg.data)
        warm = self._read()[: cfg.compute.batch_size]  # first calls (allocator, thread pools) out of the numbers
        for part in ("score", "decode", "finish"):
            self.worker.run(warm, part)

    def _read(self) -> list[dict]:
        import pyarrow as pa

        from hscr_platform.generation.graph import chunk_descriptor, read_chunk_batch, unpack

        descriptors = pa.Table.from_pylist([chunk_descriptor(c) for c in self.plan.chunks])
        return unpack(read_chunk_batch(descriptors, data=self.cfg.data))

    def measure(self, out: Path) -> dict[str, Any]:
        """One timed pass over every example: read, the three stages, write."""
        from hscr_platform.generation.graph import commit_chunk

        self.worker.timings.clear()
        self.tokens.clear()
        timings: dict[str, float] = defaultdict(float)
        with PeakRss() as memory:
            t0 = time.perf_counter()
            states = self._read()
            timings["io"] += time.perf_counter() - t0
            for part in ("score", "decode", "finish"):
                self.worker.run(states, part)
            t0 = time.perf_counter()
            entry = commit_chunk(out, 0, states)
            timings["io"] += time.perf_counter() - t0
        for stage, seconds in self.worker.timings.items():
            timings[stage] += seconds
        return _report(timings, entry, self.plan.rows, self.tokens["tokens"], memory, states)


def _report(timings: dict[str, float], entry: dict, n: int, tokens: int, memory: PeakRss, states: list) -> dict:
    total = sum(timings.values())
    return {
        "examples": n,
        "preferences": entry["preferences"],
        "rejects": entry["rejects"],
        "reject_reasons": entry["reject_reasons"],
        "seconds": round(total, 3),
        "examples_per_s": round(n / total, 3),
        "forward_tokens_per_example": round(tokens / n, 1),
        "peak_rss_mib": round(memory.peak, 1),  # the process: both variants' models are loaded
        "pass_peak_extra_mib": round(memory.peak - memory.start, 1),  # over the RSS when the pass began
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
        "stage_share": {k: round(v / total, 3) for k, v in sorted(timings.items())},
        "_outputs": [s.get("preference", {}).get("response_token_ids") for s in sorted(states, key=lambda s: s["row"])],
    }


def run_generate_benchmark(
    output: str | Path | None = None,
    *,
    examples: int = 64,
    batch_size: int = 16,
    threads: int = 2,
    max_new_tokens: int = 32,
    similarity: str = "embedding",
    repeats: int = 3,
    question_types: tuple[str, ...] = (),
) -> dict:
    """Benchmark both variants on the same data; write ``<output>/generate.json`` (or ``output`` if .json)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir, samples, model_kind = _model_and_samples(tmp, examples)
        if question_types:  # e.g. ("report",): long answers, many levels per example
            samples = _filtered(samples, question_types, examples, tmp)

        def config(reuse: bool, rows: int) -> Any:
            return _config(
                samples,
                model_dir,
                reuse=reuse,
                examples=rows,
                batch_size=batch_size,
                threads=threads,
                max_new_tokens=max_new_tokens,
                similarity=similarity,
            )

        variants = {
            "baseline": Variant(config(False, examples), model_dir),
            "optimised": Variant(config(True, examples), model_dir),
        }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(repeats):  # alternate, keep each side's fastest pass: load from elsewhere hits both
            for name, variant in variants.items():
                runs[name].append(variant.measure(tmp / f"{name}-{r}"))
        base, opt = (min(runs[name], key=lambda m: m["seconds"]) for name in ("baseline", "optimised"))
    same = base.pop("_outputs") == opt.pop("_outputs")
    result = {
        "benchmark": "generate",
        "model": f"{model_kind}: {model_dir}",
        "samples": str(samples),
        "torch_threads": threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "similarity": similarity,
        "question_types": list(question_types) or "all",
        "examples_per_s": opt["examples_per_s"],
        "baseline_examples_per_s": base["examples_per_s"],
        "speedup": round(opt["examples_per_s"] / base["examples_per_s"], 2),
        "forward_tokens_per_example": opt["forward_tokens_per_example"],
        "baseline_forward_tokens_per_example": base["forward_tokens_per_example"],
        "peak_rss_mib": opt["peak_rss_mib"],
        "baseline_peak_rss_mib": base["peak_rss_mib"],
        "pass_peak_extra_mib": opt["pass_peak_extra_mib"],
        "baseline_pass_peak_extra_mib": base["pass_peak_extra_mib"],
        "same_outputs": same,
        "optimised": opt,
        "baseline": base,
    }
    if output is not None:
        path = Path(output) if str(output).endswith(".json") else Path(output) / "generate.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"[bench generate] {json.dumps({k: result[k] for k in list(result)[8:16]})} -> {path}")
    return result
