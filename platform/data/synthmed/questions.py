"""SynthMed's questions: templates per question type, the language prior, and the mix per scan.

See platform/data/synthmed/job.py for the world and docs/DATA.md ("SynthMed") for every type with examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from hscr_platform.data.synthmed.instruct import instruction_for_scene
from hscr_platform.data.synthmed.render import KINDS, MODALITY_NAME, POSITIONS, Scene

if TYPE_CHECKING:
    from hscr_platform.data.synthmed.job import SynthMedConfig

QUESTION_TYPES = ("presence", "position", "modality", "location", "abnormality", "count", "organ", "report")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    answer_type: str  # closed | open | report
    question_type: str  # one of QUESTION_TYPES


PRESENCE_TEMPLATES = ("is there {a} {kind}?", "does the image show {a} {kind}?", "is {a} {kind} present?",
                      "can you see {a} {kind}?")  # fmt: skip
POSITION_TEMPLATES = ("is the {kind} {where}?", "is the {kind} located {where}?")
MODALITY_PHRASE = {"ct": "a ct scan", "mri": "an mri scan", "xray": "an x-ray"}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "upper": "in the upper part",
    "lower": "in the lower part",
}
PLURAL = {"nodule": "nodules", "mass": "masses", "effusion": "effusions", "cyst": "cysts"}
NUMBER = ("zero", "one", "two", "three")


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    """One item, uniformly (much faster than rng.choice on a short list)."""
    return items[int(rng.integers(len(items)))]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _english_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def report_sentence(scene: Scene) -> str:
    """E.g. "ct of the chest showing a nodule on the left and a mass on the right." (POSITIONS order)"""
    head = f"{MODALITY_NAME[scene.modality]} of the {scene.organ}"
    if not scene.findings:
        return f"{head} with no abnormality."
    ordered = sorted(scene.findings, key=lambda f: POSITIONS.index(f.position))
    return f"{head} showing {_english_list([f'{_a(f.kind)} {f.kind} {WHERE[f.position]}' for f in ordered])}."


def _presence_texts(kind: str) -> list[str]:
    return [t.format(a=_a(kind), kind=kind) for t in PRESENCE_TEMPLATES]


def _presence(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    yes = rng.random() < yes_rate
    present = scene.kinds()
    pool = present if yes else [k for k in KINDS if k not in present]
    if not pool:  # a "yes" about a normal scan: the slot gets another question type
        return None
    fresh = [k for k in pool if asked.isdisjoint(_presence_texts(k))]  # prefer a kind not yet asked about
    kind = _pick(rng, fresh or pool)
    unused = [t for t in _presence_texts(kind) if t not in asked]
    if not unused:
        return None
    return Question(_pick(rng, unused), "yes" if yes else "no", "closed", "presence")


def _unique_kinds(scene: Scene) -> list[str]:
    """Kinds present exactly once: only those have a well-defined position."""
    return [k for k in scene.kinds() if scene.count(k) == 1]


def _position(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    kinds = _unique_kinds(scene)
    if not kinds:
        return None
    kind = _pick(rng, kinds)
    truth = next(f.position for f in scene.findings if f.kind == kind)
    yes = rng.random() < yes_rate
    where = truth if yes else _pick(rng, [p for p in POSITIONS if p != truth])
    unused = [t.format(kind=kind, where=WHERE[where]) for t in POSITION_TEMPLATES]
    unused = [text for text in unused if text not in asked]  # a second phrasing keeps the yes-rate unbiased
    return Question(_pick(rng, unused), "yes" if yes else "no", "closed", "position") if unused else None


def _location(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    kinds = _unique_kinds(scene)
    if not kinds:
        return None
    kind = _pick(rng, kinds)
    truth = next(f.position for f in scene.findings if f.kind == kind)
    return Question(f"where is the {kind}?", truth, "open", "location")


def _modality(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    if rng.random() < 0.5:
        return Question("what modality is this?", MODALITY_NAME[scene.modality], "open", "modality")
    yes = rng.random() < 0.5
    others = [m for m in MODALITY_PHRASE if m != scene.modality]
    asked_about = scene.modality if yes else _pick(rng, others)
    return Question(f"is this {MODALITY_PHRASE[asked_about]}?", "yes" if yes else "no", "closed", "modality")


def _abnormality(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    answer = _english_list(scene.kinds()) if scene.findings else "no abnormality"
    return Question("what abnormality is seen?", answer, "open", "abnormality")


def _count(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    present = scene.kinds()
    kind = _pick(rng, present if present and rng.random() < 0.5 else KINDS)
    return Question(f"how many {PLURAL[kind]} are there?", NUMBER[scene.count(kind)], "open", "count")


def _organ(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    return Question("which organ is shown?", scene.organ, "open", "organ")


def _report(scene: Scene, rng: np.random.Generator, yes_rate: float, asked: set[str]) -> Question | None:
    return Question("describe the image.", report_sentence(scene), "report", "report")


_ASK: dict[str, Callable[[Scene, np.random.Generator, float, set[str]], Question | None]] = {
    "presence": _presence, "position": _position, "modality": _modality, "location": _location,
    "abnormality": _abnormality, "count": _count, "organ": _organ, "report": _report,
}  # fmt: skip
_ANY_SCAN = ("modality", "abnormality", "count", "organ", "report")  # askable of every scan: >= 11 questions


def split_yes_rates(cfg: SynthMedConfig, split: str) -> dict[str, float]:
    """Target share of "yes" answers per closed question type in ``split`` (the prior lives in train only)."""
    if split in ("train", "instruct"):
        return {"presence": cfg.prior.presence_yes_train, "position": cfg.prior.position_yes_train}
    return {"presence": 0.5, "position": 0.5}


def questions_for_scene(
    scene: Scene, *, rng: np.random.Generator, cfg: SynthMedConfig, split: str, count: int | None = None
) -> list[Question]:
    """``count`` (default ``cfg.questions_per_image``) distinct questions about ``scene``.

    Each slot draws a type from ``cfg.question_mix``; a question the scan cannot support (a "yes" presence
    question about a normal scan, a position for a kind seen twice, a repeat) is replaced by a uniformly drawn
    type from _ANY_SCAN. Normal scans cannot get a "yes", so presence draws "yes" with
    q = p / (1 - f0 (1 - p)) (f0 = normal_fraction): the share of "yes" among presence questions is then
    (1 - f0) q / ((1 - f0) q + 1 - q) = p exactly in expectation.
    """
    if split == "instruct":
        return _instructions(scene, rng, cfg.questions_per_image if count is None else count)
    rates = split_yes_rates(cfg, split)
    p, f0 = rates["presence"], cfg.normal_fraction
    yes_rate = {"presence": p / (1 - f0 * (1 - p)), "position": rates["position"]}
    mix = asdict(cfg.question_mix)
    types, cumulative = list(mix), np.cumsum(list(mix.values()))
    asked: set[str] = set()
    out: list[Question] = []
    for _ in range(cfg.questions_per_image if count is None else count):
        qtype = types[int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))]
        question = _ASK[qtype](scene, rng, yes_rate.get(qtype, 0.5), asked)
        while question is None or question.question in asked:
            qtype = _pick(rng, _ANY_SCAN)
            question = _ASK[qtype](scene, rng, 0.5, asked)
        asked.add(question.question)
        out.append(question)
    return out


def _instructions(scene: Scene, rng: np.random.Generator, count: int) -> list[Question]:
    """``count`` instruction turns about ``scene`` (answer_type "report"), distinct questions where possible."""
    asked: set[str] = set()
    out = []
    for _ in range(count):
        question, answer, qtype = instruction_for_scene(scene, rng, exclude=asked)
        asked.add(question)
        out.append(Question(question, answer, "report", qtype))
    return out
