"""Answering a test set with a model and scoring it with the LLaVA-Med protocol (hscr.metrics).

Closed (yes/no) questions score accuracy, open ones token recall (reports too; their BLEU / ROUGE-L are
in ``hscr_platform.evaluation.metrics``). On SynthMed presence questions, the bias figures: how often the model says
"yes" against how often the truth is "yes", and the false-"yes" rate (a "yes" when the finding is absent) —
the language prior at work.

Two ways to answer: ``evaluate_folder`` (one process, the SFT job's quick check) and ``AnswerActor`` (a Ray
Data callable class for the evaluation job: the model loaded once per actor, transformers or vLLM, and
optionally a blanked copy of every image for the image-reliance gap).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from hscr.metrics import closed_hit, first_yes_no, normalize_answer, open_recall
from hscr_platform.core.io import iter_rows, shard_files
from hscr_platform.models.loading import ModelConfig, generate_answers, load_vlm, open_image


def question_order(questions: Sequence[str]) -> list[int]:
    """Row indices sorted by question text (stable): a batch decodes until its longest answer ends, so rows that
    ask the same thing ("is there a nodule?", "describe the image.") answer together and a batch of yes/no
    questions stops after a few tokens instead of waiting for a report. Greedy answers do not depend on it."""
    return sorted(range(len(questions)), key=lambda i: questions[i])


def answer_rows(model: Any, processor: Any, rows: Sequence[dict], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy answer to every row (image bytes + question), in row order; batched in question order
    (``question_order``), with a progress bar."""
    order = question_order([r["question"] for r in rows])
    answers: list[str] = [""] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc="answering", unit="batch", leave=False):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        images = [open_image(r["image"]) for r in chunk]
        got = generate_answers(model, processor, images, [r["question"] for r in chunk], max_new_tokens=max_new_tokens)
        for i, answer in zip(order[start : start + batch_size], got, strict=True):
            answers[i] = answer
    return answers


def score_row(row: dict, prediction: str) -> float:
    """1/0 for a closed question (accuracy), token recall in [0, 1] for open and report answers."""
    if row["answer_type"] == "closed":
        return float(closed_hit(prediction, row["answer"]))
    return open_recall(prediction, row["answer"])


def summarize(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, Any]:
    """Overall and per-question-type scores, plus the yes-bias figures on closed yes/no questions."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    for row, pred in zip(rows, predictions, strict=True):
        score = score_row(row, pred)
        by_type[row.get("question_type") or row["answer_type"]].append(score)
        by_answer_type[row["answer_type"]].append(score)
    metrics: dict[str, Any] = {
        "n": len(rows),
        "closed_accuracy": _mean(by_answer_type.get("closed", [])),
        "open_recall": _mean(by_answer_type.get("open", [])),
        "report_recall": _mean(by_answer_type.get("report", [])),
        "per_type": {t: {"n": len(v), "score": _mean(v)} for t, v in sorted(by_type.items())},
    }
    metrics.update(yes_bias(rows, predictions))
    return metrics


def yes_bias(rows: Sequence[dict], predictions: Sequence[str], *, types: Iterable[str] = ("presence",)) -> dict:
    """On yes/no questions of the given types: predicted vs true "yes" rates and the false-"yes" rate."""
    wanted = set(types)
    pairs = [
        (normalize_answer(r["answer"]), first_yes_no(p))
        for r, p in zip(rows, predictions, strict=True)
        if r.get("question_type") in wanted and normalize_answer(r["answer"]) in ("yes", "no")
    ]
    if not pairs:
        return {}
    negatives = [pred for truth, pred in pairs if truth == "no"]
    return {
        "presence_n": len(pairs),
        "presence_accuracy": _mean([float(truth == pred) for truth, pred in pairs]),
        "presence_yes_rate": _mean([float(pred == "yes") for _, pred in pairs]),
        "presence_truth_yes_rate": _mean([float(truth == "yes") for truth, _ in pairs]),
        "presence_false_yes_rate": _mean([float(pred == "yes") for pred in negatives]),
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate_folder(
    model_dir: str | Path, data_dir: str | Path, *, samples: int, batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """Load a model folder, answer the first ``samples`` rows of a sample dataset, score them."""
    model, processor = load_vlm(ModelConfig(path=str(model_dir)))
    rows = list(itertools.islice(iter_rows(data_dir), samples))
    predictions = answer_rows(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    examples = [
        {
            "question": r["question"],
            "answer": r["answer"],
            "prediction": p,
            "question_type": r["question_type"],
        }
        for r, p in zip(rows[:24], predictions, strict=False)
    ]
    return {"metrics": summarize(rows, predictions), "examples": examples}


def evaluate_folder_cached(model_dir: str | Path, data_dir: str | Path, **settings: int) -> dict[str, Any]:
    """``evaluate_folder``, kept beside the model folder as ``scores-<key>.json`` and reused on a rerun (a sweep
    restarted over finished trials). The key covers the settings and the data's shard files (name, size,
    mtime); the file lives in the run's own folder, which is cleared whenever the run is redone."""
    shards = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in shard_files(data_dir)]
    text = json.dumps({"data": str(Path(data_dir).resolve()), "shards": shards, **settings}, sort_keys=True)
    cached = Path(model_dir).parent / f"scores-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if cached.is_file():
        return dict(json.loads(cached.read_text()))
    report = evaluate_folder(model_dir, data_dir, **settings)
    cached.write_text(json.dumps(report, indent=2))
    return report


# --- batch answering in Ray Data actors (the evaluation job) --------------------------------------------

VIEWS = ("image", "blank")  # the real image; a mid-grey image of the same size (the image-reliance gap)
BLANK_GREY = (128, 128, 128)


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform mid-grey RGB image of ``image``'s size: the "no visual information" view."""
    return Image.new("RGB", image.size, BLANK_GREY)


@dataclass(frozen=True, kw_only=True)
class AnswerSpec:
    """What an answering actor needs (pickled to it)."""

    model_dir: str  # absolute path: actors may run in another working directory
    engine: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = 32
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # hf engine: "cuda" when the actor holds a GPU
    torch_threads: int | None = None  # hf engine on CPU: threads per actor (None = torch's default)
    vllm: dict[str, Any] = field(default_factory=dict)  # VllmConfig keys (engine: vllm)


Answerer = Callable[[list[Image.Image], list[str]], list[str]]


def _hf_answerer(spec: AnswerSpec) -> Answerer:
    """Greedy answers with transformers' ``generate`` (the same path as ``evaluate_folder``)."""
    import torch

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    model, processor = load_vlm(ModelConfig(path=spec.model_dir, dtype=spec.dtype))
    model.to(spec.device)

    def answer(images: list[Image.Image], questions: list[str]) -> list[str]:
        return generate_answers(model, processor, images, questions, max_new_tokens=spec.max_new_tokens)

    return answer


def engines_vllm_module() -> Any:
    """``hscr_platform.models.engines.vllm``, imported lazily (it imports vLLM only when an engine starts)."""
    try:
        return importlib.import_module("hscr_platform.models.engines.vllm")
    except ModuleNotFoundError as exc:
        if exc.name != "hscr_platform.models.engines.vllm":
            raise
        raise ValueError("engine 'vllm' needs platform/models/engines/vllm.py (the vLLM decoder), which is not "
                         "installed; use engine: hf") from None  # fmt: skip


def _vllm_answerer(spec: AnswerSpec) -> Answerer:
    """Greedy answers with vLLM: continuations of nothing forced, through the generation job's decoder."""
    from hscr_platform.core.config import from_dict
    from hscr_platform.models.engines.decoding import ContinuationRequest

    engines = engines_vllm_module()
    cfg = from_dict(engines.VllmConfig, {"dtype": spec.dtype, **spec.vllm}, where="vllm")
    decoder = engines.VllmDecoder(spec.model_dir, cfg)
    tokenizer, budget = decoder.processor.tokenizer, spec.max_new_tokens

    def answer(images: list[Image.Image], questions: list[str]) -> list[str]:
        requests = [
            ContinuationRequest(example_id=str(i), image=im, question=q, forced=(), max_new_tokens=budget)
            for i, (im, q) in enumerate(zip(images, questions, strict=True))
        ]
        outs = decoder.continue_greedy(requests)
        return [tokenizer.decode(list(o.token_ids), skip_special_tokens=True).strip() for o in outs]

    return answer


class AnswerActor:
    """Ray Data callable class: adds the column ``column`` (the model's answers) to batches of (source, id,
    view, image, question). The model is loaded once, in ``__init__``; a ``view == "blank"`` row is answered
    about the blanked image. ``keep_inputs=False`` drops image and question (the last model of a chain)."""

    def __init__(self, spec: AnswerSpec, *, column: str = "prediction", keep_inputs: bool = False):
        self.answer = _hf_answerer(spec) if spec.engine == "hf" else _vllm_answerer(spec)
        self.column, self.keep_inputs = column, keep_inputs

    def __call__(self, batch: pa.Table) -> pa.Table:
        views = batch.column("view").to_pylist()
        images = [open_image(b) for b in batch.column("image").to_pylist()]
        images = [blank_like(im) if v == "blank" else im for im, v in zip(images, views, strict=True)]
        predictions = pa.array(self.answer(images, batch.column("question").to_pylist()), pa.string())
        if not self.keep_inputs:
            batch = batch.drop_columns(["image", "question"])
        return batch.append_column(self.column, predictions)
