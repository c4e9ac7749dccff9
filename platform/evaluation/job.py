"""The evaluation job (``python -m jobs.evaluate``): several models answer one test set on Ray Data, then the
LLaVA-Med metrics, SynthMed's hallucination and image-reliance figures, a comparison table, plots and MLflow.

    sample shards -> read tasks: keep the selected rows, one copy per view (image / blank)
      -> AnswerActor pool (model loaded once per actor; transformers, or vLLM)
      -> predictions joined back on the driver by (source, id, view) -> eval_metrics per model
      -> predictions.parquet written chunk by chunk as each model is scored (never all records at once)
      -> table.md, results.json, PNGs -> MLflow

Models are answered one after the other (each gets the whole actor pool, then frees it). Everything the job
needs is checked before Ray starts: each data folder and its columns, each model folder (an image-text model
with safetensors weights), the vLLM engine module when ``engine: vllm``. Metric definitions:
``hscr_platform.evaluation.metrics`` and docs/EVALUATION.md.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from hscr_platform.core.config import config_hash, from_dict, save_config
from hscr_platform.core.io import shard_files
from hscr_platform.core.runtime import RayConfig, init_ray
from hscr_platform.core.tracking import TrackingConfig
from hscr_platform.evaluation.metrics import ClosedMatch, model_metrics, reliance_gap, row_records
from hscr_platform.evaluation.report import flat_metrics, markdown_report, write_report
from hscr_platform.models.answering import VIEWS, AnswerActor, AnswerSpec, engines_vllm_module, question_order
from hscr_platform.models.loading import check_vlm_folder

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a table column, a metric prefix, a file-safe name
REQUIRED_COLUMNS = ("id", "source", "image", "question", "answer", "answer_type")
META_COLUMNS = ("id", "source", "question", "answer", "answer_type", "question_type", "findings")
READ_CPUS = 0.25  # read tasks: small, so that they never wait behind the actors on a 2-CPU machine

PREDICTION_SCHEMA = pa.schema([
    ("model", pa.string()), ("view", pa.string()), ("id", pa.string()), ("source", pa.string()),
    ("question_type", pa.string()), ("answer_type", pa.string()), ("question", pa.string()),
    ("answer", pa.string()), ("prediction", pa.string()), ("score", pa.float64()),
    ("claims", pa.list_(pa.string())), ("hallucinated", pa.list_(pa.string())),
])  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvalDataConfig:
    path: str | tuple[str, ...]  # sample folder(s) in the common schema; several datasets are scored per source
    max_rows: int | None = None  # the first rows of each folder (None = all)
    blank_image_gap: bool = True  # also answer every row about a mid-grey image (the image-reliance gap)

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or null, got {self.max_rows}")
        if not self.folders():
            raise ValueError("path: give at least one sample folder")

    def folders(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


@dataclass(frozen=True, kw_only=True)
class ActorsConfig:
    num_actors: int = 1  # answering actors per model
    cpus_per_actor: float = 1.0  # fractional on small machines (read tasks need CPU too, or Ray Data stalls)
    gpus_per_actor: float = 0.0  # > 0: the hf engine runs on "cuda"; vLLM needs 1 (x tensor_parallel_size)
    torch_threads: int | None = 1  # hf engine on CPU: threads per actor (null = torch's default)
    # true: every model's actors at once, one pass (small models: actor start-up overlaps); false: one model
    # after the other, each with the whole pool (large models: num_actors x gpus_per_actor GPUs per model)
    models_together: bool = False

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("num_actors must be >= 1, cpus_per_actor > 0 and gpus_per_actor >= 0")


@dataclass(frozen=True, kw_only=True)
class EvalOutputConfig:
    path: str = "runs/evaluate/tiny"  # table.md, results.json, *.png, predictions.parquet, config.yaml


@dataclass(frozen=True, kw_only=True)
class EvaluateJobConfig:
    """Evaluate several Med-VLMs on one test set: Ray Data batch inference, metrics, report, MLflow."""

    data: EvalDataConfig
    models: dict[str, str]  # name -> local Hugging Face VLM folder; the table's columns, in this order
    engine: Literal["hf", "vllm"] = "hf"  # transformers (CPU or GPU) or vLLM (platform/models/engines/vllm.py)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 16  # rows per actor call (one generate batch)
    max_new_tokens: int = 32
    # closed questions: "contains" (LLaVA-Med's rule, whole words) or "strict" (a yes/no answer must not hedge)
    closed_match: ClosedMatch = "contains"
    vllm: dict[str, Any] = field(default_factory=dict)  # VllmConfig keys (engine: vllm only)
    progress_bars: bool = False  # Ray Data's progress bars / progress log lines
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="hscr-evaluate"))
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one {name: model folder}")
        bad = [name for name in self.models if not MODEL_NAME.match(name)]
        if bad:
            raise ValueError(f"models: names {bad} must be letters, digits, '_', '.', '-'")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.vllm and self.engine != "vllm":
            raise ValueError("vllm settings are given but engine is not 'vllm'")


# --- checks before any Ray work -------------------------------------------------------------------------


@dataclass(frozen=True)
class TestSet:
    rows: list[dict[str, Any]]  # every evaluated row without its image, in order (what the metrics read)
    files: list[str]  # absolute paths of the shards holding them
    keys: frozenset[tuple[str, str]] | None  # (source, id) to keep from those shards; None = all of them


def check_data(folder: str) -> list[Path]:
    """The shards of a sample folder; fails, naming the folder, when there are none or columns are missing."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"data.path: {folder} does not exist")
    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"data.path: no sample shards (part-*.parquet) in {folder}")
    missing = [c for c in REQUIRED_COLUMNS if c not in pq.read_schema(files[0]).names]
    if missing:
        raise ValueError(f"data.path: {files[0]} lacks the column(s) {missing} (see docs/DATA.md)")
    return files


def _meta_rows(file: Path, limit: int | None) -> list[dict[str, Any]]:
    names = pq.read_schema(file).names
    rows = pq.read_table(file, columns=[c for c in META_COLUMNS if c in names]).to_pylist()
    return [{c: r.get(c) for c in META_COLUMNS} for r in rows[:limit]]


def select_rows(data: EvalDataConfig) -> TestSet:
    """The first ``max_rows`` rows of each folder (metadata only), and the shards Ray Data reads them from."""
    rows: list[dict[str, Any]] = []
    files: list[str] = []
    for folder in data.folders():
        taken = 0
        for file in check_data(folder):
            left = None if data.max_rows is None else data.max_rows - taken
            if left is not None and left <= 0:
                break
            part = _meta_rows(file, left)
            rows += part
            taken += len(part)
            files.append(str(file.resolve()))
    keys = [(str(r["source"]), str(r["id"])) for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"data.path: (source, id) {dup} occurs more than once; ids must be unique per source")
    return TestSet(rows, files, frozenset(keys) if data.max_rows is not None else None)


def check_models(models: dict[str, str]) -> dict[str, str]:
    """name -> absolute model folder, each checked to be a local image-text model with safetensors."""
    out = {}
    for name, path in models.items():
        try:
            out[name] = str(check_vlm_folder(path).resolve())
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"models.{name}: {exc}") from None
    return out


def check_engine(cfg: EvaluateJobConfig) -> None:
    """engine vllm: the engine module, its settings and the vllm package must be there."""
    if cfg.engine != "vllm":
        return
    engines = engines_vllm_module()
    from_dict(engines.VllmConfig, {"dtype": cfg.dtype, **cfg.vllm}, where="vllm")
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # origin None: a namespace package (e.g. tests/vllm), not vLLM
        raise ValueError(f"engine 'vllm': {engines.INSTALL_HINT}")


# --- Ray Data: answering ------------------------------------------------------------------------------


def expand_views(batch: pa.Table, *, keys: frozenset[tuple[str, str]] | None, views: tuple[str, ...]) -> pa.Table:
    """Keep the selected rows of a batch; one copy of each per view (the ``view`` column says which image)."""
    if keys is not None:
        pairs = zip(batch.column("source").to_pylist(), batch.column("id").to_pylist(), strict=True)
        batch = batch.filter(pa.array([(str(s), str(i)) in keys for s, i in pairs], pa.bool_()))
    return pa.concat_tables(
        [batch.append_column("view", pa.array([view] * batch.num_rows, pa.string())) for view in views]
    )


INPUT_COLUMNS = ["source", "id", "image", "question"]


def read_shards(items: pa.Table, *, keys: frozenset[tuple[str, str]] | None, views: tuple[str, ...]) -> pa.Table:
    """A Ray Data task: read the shards named in ``items`` (column ``file``), keep the selected rows, add the
    views. Used instead of ``ray.data.read_parquet``, whose file-listing step reserves a whole CPU: with the
    answering actors holding most of a 2-CPU machine it never gets one and the job hangs."""
    tables = [pq.read_table(f, columns=INPUT_COLUMNS) for f in items.column("file").to_pylist()]
    batch = expand_views(pa.concat_tables(tables), keys=keys, views=views)
    return batch.take(question_order(batch.column("question").to_pylist()))  # yes/no batches stop early


def answer_spec(cfg: EvaluateJobConfig, model_dir: str) -> AnswerSpec:
    return AnswerSpec(
        model_dir=model_dir, engine=cfg.engine, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
        device="cuda" if cfg.actors.gpus_per_actor and cfg.engine == "hf" else "cpu",
        torch_threads=cfg.actors.torch_threads, vllm=dict(cfg.vllm),
    )  # fmt: skip


def answer_dataset(cfg: EvaluateJobConfig, test: TestSet, models: dict[str, str], views: tuple[str, ...]) -> Any:
    """read -> select + views (tasks) -> one AnswerActor pool per model, chained; rows out: (source, id, view,
    ``answer:<model>`` for each model)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress_bars
    ds: Any = ray.data.from_items([{"file": f} for f in test.files], override_num_blocks=len(test.files))
    read = functools.partial(read_shards, keys=test.keys, views=views)
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)  # one shard a task
    a = cfg.actors
    for i, (name, folder) in enumerate(models.items()):
        kwargs = {
            "spec": answer_spec(cfg, folder),
            "column": f"answer:{name}",
            "keep_inputs": i < len(models) - 1,
        }
        ds = ds.map_batches(
            AnswerActor, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=a.num_actors), num_cpus=a.cpus_per_actor,
            num_gpus=a.gpus_per_actor or None,
        )  # fmt: skip
    return ds


def answer_all(
    cfg: EvaluateJobConfig, test: TestSet, models: dict[str, str], views: tuple[str, ...]
) -> dict[str, dict[str, list[str]]]:
    """model -> view -> its answer to every row of ``test``, in row order (joined back by (source, id))."""
    got = {(str(r["source"]), str(r["id"]), r["view"]): r for r in answer_dataset(cfg, test, models, views).iter_rows()}
    wanted = [(str(r["source"]), str(r["id"])) for r in test.rows]
    missing = [(s, i, v) for v in views for s, i in wanted if (s, i, v) not in got]
    if missing:
        raise RuntimeError(f"{len(missing)} answers missing from the Ray Data output, e.g. {missing[0]}")
    return {m: {v: [got[(s, i, v)][f"answer:{m}"] for s, i in wanted] for v in views} for m in models}


def passes(cfg: EvaluateJobConfig, models: dict[str, str], cpus: float) -> list[dict[str, str]]:
    """The models answered together in each Ray Data pass: as many at once as the cluster's ``cpus`` can place
    beside one read task (every model's actor pool holds its CPUs for the whole pass: 7 pools of 0.75 CPU on 2
    CPUs never started, and 4 pools of 0.5 CPU took all 2, so the read task never ran), or one after the other."""
    names = list(models)
    pool = cfg.actors.num_actors * cfg.actors.cpus_per_actor
    size = max(1, int((cpus - READ_CPUS) // pool)) if cfg.actors.models_together else 1
    return [{n: models[n] for n in names[k : k + size]} for k in range(0, len(names), size)]


# --- scoring, report, tracking -------------------------------------------------------------------------


def score_model(
    rows: list[dict], answers: dict[str, list[str]], *, closed_match: ClosedMatch = "contains"
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metrics with the image [+ reliance gap], metrics with the image blanked or None)."""
    metrics = model_metrics(rows, answers["image"], closed_match=closed_match)
    if "blank" not in answers:
        return metrics, None
    blanked = model_metrics(rows, answers["blank"], closed_match=closed_match)
    metrics.update(reliance_gap(metrics, blanked))
    return metrics, blanked


PREDICTION_CHUNK = 1024  # rows turned into prediction records (and written) at a time


class PredictionWriter:
    """predictions.parquet written as it goes: the driver holds one chunk of records, never every prediction."""

    def __init__(self, path: Path):
        self.path, self.rows = path, 0
        self._writer = pq.ParquetWriter(path, PREDICTION_SCHEMA)

    def write(self, rows: list[dict], predictions: list[str], *, model: str, view: str) -> None:
        """One model's answers to ``rows`` in one view, converted and written ``PREDICTION_CHUNK`` at a time."""
        for k in range(0, len(rows), PREDICTION_CHUNK):
            records = row_records(rows[k : k + PREDICTION_CHUNK], predictions[k : k + PREDICTION_CHUNK],
                                  model=model, view=view)  # fmt: skip
            self._writer.write_table(pa.Table.from_pylist(records, schema=PREDICTION_SCHEMA))
            self.rows += len(records)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()


def start_tracking(cfg: EvaluateJobConfig, out: Path) -> Any:
    if not cfg.tracking.enabled:
        return None
    from hscr_platform.core import tracking

    uri = tracking.tracking_uri(cfg.tracking, out.resolve().parent)
    run = tracking.start_run(uri=uri, experiment=cfg.tracking.experiment, run_name=f"evaluate-{config_hash(cfg)}")
    tracking.log_config(run, cfg)
    return run


def finish_tracking(run: Any, results: dict[str, dict[str, Any]], files: list[Path]) -> None:
    """Per-model metrics (``<model>.<metric>``, step 0) and every output file as an artifact."""
    from hscr_platform.core import tracking

    flat = flat_metrics(results)
    if flat:
        tracking.log_metrics_history(run, [{"step": 0, **flat}], key=next(iter(flat)))
    for path in files:
        tracking.log_artifacts(run, path)
    tracking.end_run(run)


def evaluate(cfg: EvaluateJobConfig, test: TestSet, models: dict[str, str], out: Path) -> dict[str, Any]:
    """Answer with every model, score, and write the outputs; returns results.json's content."""
    views = VIEWS if cfg.data.blank_image_gap else VIEWS[:1]
    results: dict[str, dict[str, Any]] = {}
    blanked: dict[str, dict[str, Any]] = {}
    init_ray(cfg.ray)
    import ray

    with PredictionWriter(out / "predictions.parquet") as writer:
        for group in passes(cfg, models, float(ray.cluster_resources().get("CPU", 0.0))):
            t0 = time.time()
            answers = answer_all(cfg, test, group, views)
            seconds, count = time.time() - t0, len(views) * len(test.rows) * len(group)
            print(f"[evaluate] {', '.join(group)}: {count} answers in {seconds:.1f}s", flush=True)
            for name in group:
                results[name], blank = score_model(test.rows, answers[name], closed_match=cfg.closed_match)
                results[name].update(seconds=round(seconds, 2), answers_per_s=round(count / seconds, 2))
                if blank is not None:
                    blanked[name] = blank
                for v in views:
                    writer.write(test.rows, answers[name][v], model=name, view=v)
            del answers  # one pass's answers at a time
    return {"rows": len(test.rows), "data": list(cfg.data.folders()), "models": models,
            "results": results, "blank_image": blanked}  # fmt: skip


def run(cfg: EvaluateJobConfig) -> dict[str, Any]:
    """Check the inputs, answer and score with every model, write and log the report; returns its summary."""
    test = select_rows(cfg.data)  # bad inputs fail here, before Ray starts
    models = check_models(cfg.models)
    check_engine(cfg)
    out = Path(cfg.output.path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracked = start_tracking(cfg, out)
    try:
        payload = evaluate(cfg, test, models, out)
        files = list(write_report(out, payload["results"], payload).values())
        files.append(out / "predictions.parquet")
    except BaseException:
        if tracked is not None:
            from hscr_platform.core.tracking import end_run

            end_run(tracked, "FAILED")
        raise
    if tracked is not None:
        finish_tracking(tracked, payload["results"], files)
    print("\n" + markdown_report(payload["results"]), flush=True)
    print(f"[evaluate] outputs: {out}" + (f"  mlflow run: {tracked.run_id} ({tracked.uri})" if tracked else ""))
    return {"output": str(out), "mlflow_run_id": tracked.run_id if tracked else None, **payload}
