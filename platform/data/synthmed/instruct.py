"""SynthMed's instruction conversations: descriptive answers like LLaVA-Med's instruction-tuning data.

Four kinds of request, several phrasings each; every answer is one to three sentences and is exact for its scan:

    instruct_describe  "describe the findings."       -> "this is a ct of the chest. there is a small nodule on
                                                          the left and a large mass in the lower part. no effusion
                                                          or cyst is seen."
    instruct_abnormal  "what is abnormal and where?"  -> "a small nodule on the left and a large mass in the lower
                                                          part. no effusion or cyst is seen."
    instruct_compare   "compare the two sides."       -> "the left side shows a small nodule; the right side is
                                                          clear. there is also a large mass in the lower part."
    instruct_followup  "tell me more about the cyst." -> "the cyst is medium-sized and lies in the upper part." /
                                                          "no cyst is seen in this scan."

Answers name the modality and organ (describe), and each finding's kind, size, position and count, and say what is
absent. Such answers have many image-dependent tokens (kind, side, size, count), so one answer can give HSCR
several graded dispreferred levels; a one-word VQA answer gives at most one. Sizes are terciles of each kind's size
range in the renderer (small / medium-sized / large).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hscr_platform.data.synthmed.render import KINDS, POSITIONS, SIZE_RANGE, Finding, Scene

INSTRUCTION_TYPES = ("instruct_describe", "instruct_abnormal", "instruct_compare", "instruct_followup")
DESCRIBE = ("describe the findings.", "what do you see in this scan?", "please describe this image.",
            "write a short report of this scan.", "summarize the findings of this image.")  # fmt: skip
ABNORMAL = ("what is abnormal and where?", "what abnormalities are there, and where are they?",
            "list the abnormal findings and their locations.")  # fmt: skip
COMPARE = ("compare the two sides.", "how do the left and right sides differ?", "compare the left and the right.")
FOLLOWUP = ("tell me more about the {kind}.", "what about the {kind}?", "describe the {kind}.")
WHERE = {"left": "on the left", "right": "on the right", "upper": "in the upper part", "lower": "in the lower part"}
PLURAL = {"nodule": "nodules", "mass": "masses", "effusion": "effusions", "cyst": "cysts"}
NUMBER = {2: "two", 3: "three"}
MODALITY_PHRASE = {"ct": "a ct", "mri": "an mri", "xray": "an x-ray"}


def size_word(finding: Finding) -> str:
    """small / medium-sized / large: the tercile of the finding's size within its kind's range."""
    low, high = SIZE_RANGE[finding.kind]
    third = (finding.size - low) / (high - low)
    return "small" if third < 1 / 3 else ("medium-sized" if third < 2 / 3 else "large")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def english_list(items: Sequence[str], *, conj: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conj} {items[-1]}"


def _ordered(findings: Sequence[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (KINDS.index(f.kind), POSITIONS.index(f.position)))


def sized(finding: Finding) -> str:
    """ "a small nodule" """
    size = size_word(finding)
    return f"{_a(size)} {size} {finding.kind}"


def finding_phrase(finding: Finding) -> str:
    """ "a small nodule on the left" """
    return f"{sized(finding)} {WHERE[finding.position]}"


def kind_phrase(kind: str, findings: Sequence[Finding]) -> str:
    """One kind's findings: "a small nodule on the left" or "two nodules, a small one on the left and a large one
    on the right"."""
    same = [f for f in _ordered(findings) if f.kind == kind]
    if len(same) == 1:
        return finding_phrase(same[0])
    ones = [f"{_a(size_word(f))} {size_word(f)} one {WHERE[f.position]}" for f in same]
    return f"{NUMBER[len(same)]} {PLURAL[kind]}, {english_list(ones)}"


def findings_clause(scene: Scene) -> str:
    """Every finding of the scan, grouped by kind ("" for a normal scan)."""
    return english_list([kind_phrase(kind, scene.findings) for kind in scene.kinds()]) if scene.findings else ""


def absence_sentence(scene: Scene) -> str:
    """ "no effusion or cyst is seen." / the normal-scan sentence"""
    absent = [k for k in KINDS if k not in scene.kinds()]
    if not scene.findings:
        return f"no {english_list(absent, conj='or')} is seen; the scan is normal."
    return f"no {english_list(absent, conj='or')} is seen." if absent else ""


def _join(*sentences: str) -> str:
    return " ".join(s for s in sentences if s)


def describe(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    head = f"this is {MODALITY_PHRASE[scene.modality]} of the {scene.organ}."
    if not scene.findings:
        return DESCRIBE[int(rng.integers(len(DESCRIBE)))], _join(head, absence_sentence(scene))
    clause = findings_clause(scene)
    verb = "there is" if clause.startswith(("a ", "an ")) else "there are"  # agrees with the first item
    body = f"{verb} {clause}."
    return DESCRIBE[int(rng.integers(len(DESCRIBE)))], _join(head, body, absence_sentence(scene))


def abnormal(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    question = ABNORMAL[int(rng.integers(len(ABNORMAL)))]
    if not scene.findings:
        return question, f"nothing is abnormal: {absence_sentence(scene)}"
    return question, _join(f"{findings_clause(scene)}.", absence_sentence(scene))


def _side(scene: Scene, side: str) -> str:
    here = _ordered([f for f in scene.findings if f.position == side])
    return f"the {side} side shows {english_list([sized(f) for f in here])}" if here else ""


def compare(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    question = COMPARE[int(rng.integers(len(COMPARE)))]
    left, right = _side(scene, "left"), _side(scene, "right")
    if left and right:
        sides = f"{left}; {right}."
    elif left or right:
        clear = "right" if left else "left"
        sides = f"{left or right}; the {clear} side is clear."
    else:
        sides = "both sides are clear."
    others = _ordered([f for f in scene.findings if f.position in ("upper", "lower")])
    rest = f"there is also {english_list([finding_phrase(f) for f in others])}." if others else ""
    if rest and not (left or right):
        rest = rest.replace("there is also", "there is")
    return question, _join(sides, rest)


def followup(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """About a present kind (half the time, when there is one) or an absent one, which must be denied."""
    present = scene.kinds()
    ask_present = bool(present) and rng.random() < 0.5
    pool = present if ask_present else [k for k in KINDS if k not in present]
    kind = pool[int(rng.integers(len(pool)))]
    question = FOLLOWUP[int(rng.integers(len(FOLLOWUP)))].format(kind=kind)
    if not ask_present:
        return question, f"no {kind} is seen in this scan."
    same = [f for f in scene.findings if f.kind == kind]
    if len(same) == 1:
        return question, f"the {kind} is {size_word(same[0])} and lies {WHERE[same[0].position]}."
    return question, f"there are {kind_phrase(kind, scene.findings)}."


ASK: dict[str, Callable[[Scene, np.random.Generator], tuple[str, str]]] = {
    "instruct_describe": describe, "instruct_abnormal": abnormal, "instruct_compare": compare,
    "instruct_followup": followup,
}  # fmt: skip


def instruction_for_scene(scene: Scene, rng: np.random.Generator, *, exclude: set[str]) -> tuple[str, str, str]:
    """(question, answer, question_type) of one conversation turn about ``scene``, not repeating a question in
    ``exclude`` when another is possible."""
    for _ in range(16):
        qtype = INSTRUCTION_TYPES[int(rng.integers(len(INSTRUCTION_TYPES)))]
        question, answer = ASK[qtype](scene, rng)
        if question not in exclude:
            return question, answer, qtype
    return question, answer, qtype
