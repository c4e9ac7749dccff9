"""SynthMed's instruction conversations and the train world's scene priors (platform/data/synthmed/instruct.py)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hscr_platform.core.config import load_config
from hscr_platform.core.io import read_table
from hscr_platform.data.synthmed.instruct import (
    INSTRUCTION_TYPES,
    abnormal,
    compare,
    describe,
    followup,
    size_word,
)
from hscr_platform.data.synthmed.job import SynthMedJobConfig, generate_dataset, image_samples, scene_at
from hscr_platform.data.synthmed.render import KINDS, SIZE_RANGE, USUAL_SIDE, Finding, Scene, Style, sample_scene

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "synthmed" / "tiny.yaml"
STYLE = Style(cx=0.5, cy=0.5, scale=1.0, gain=1.0, offset=0.0, gamma=1.0, noise=1.0, texture_seed=0)


def _finding(kind: str, position: str, tercile: float) -> Finding:
    low, high = SIZE_RANGE[kind]
    return Finding(kind=kind, position=position, size=low + tercile * (high - low), x=0.5, y=0.5)


TWO = Scene(modality="ct", organ="chest", style=STYLE,
            findings=(_finding("mass", "lower", 0.9), _finding("nodule", "left", 0.1)))  # fmt: skip
PAIR = Scene(modality="mri", organ="brain", style=STYLE,
             findings=(_finding("cyst", "right", 0.5), _finding("cyst", "upper", 0.95)))  # fmt: skip
NORMAL = Scene(modality="xray", organ="abdomen", style=STYLE, findings=())


def _answer(ask, scene: Scene) -> str:
    return ask(scene, np.random.default_rng(0))[1]


def test_size_words_are_terciles_of_the_kind_range():
    assert [size_word(_finding("nodule", "left", t)) for t in (0.0, 0.32, 0.34, 0.66, 0.67, 1.0)] == [
        "small", "small", "medium-sized", "medium-sized", "large", "large"]  # fmt: skip


def test_describe_names_modality_organ_every_finding_and_what_is_absent():
    assert _answer(describe, TWO) == (
        "this is a ct of the chest. there is a small nodule on the left and a large mass in the lower part. "
        "no effusion or cyst is seen."
    )
    assert _answer(describe, PAIR) == (
        "this is an mri of the brain. there are two cysts, a medium-sized one on the right and a large one in the "
        "upper part. no nodule, mass or effusion is seen."
    )
    assert _answer(describe, NORMAL) == (
        "this is an x-ray of the abdomen. no nodule, mass, effusion or cyst is seen; the scan is normal."
    )


def test_abnormal_and_compare_answers():
    assert (
        _answer(abnormal, TWO)
        == "a small nodule on the left and a large mass in the lower part. no effusion or cyst is seen."
    )
    assert _answer(abnormal, NORMAL).startswith("nothing is abnormal: no nodule, mass, effusion or cyst")
    assert _answer(compare, TWO) == (
        "the left side shows a small nodule; the right side is clear. there is also a large mass in the lower part."
    )
    assert _answer(compare, NORMAL) == "both sides are clear."
    assert _answer(compare, PAIR) == (
        "the right side shows a medium-sized cyst; the left side is clear. "
        "there is also a large cyst in the upper part."
    )


def test_followups_describe_a_present_kind_or_deny_an_absent_one():
    answers = {followup(TWO, np.random.default_rng(seed)) for seed in range(40)}
    by_question = dict(answers)
    assert by_question["tell me more about the nodule."] == "the nodule is small and lies on the left."
    assert by_question["what about the mass?"] == "the mass is large and lies in the lower part."
    assert by_question["describe the cyst."] == "no cyst is seen in this scan."
    assert {q.split()[-1].rstrip(".?") for q, _ in answers} == set(KINDS)  # present and absent kinds are asked


def test_instruct_folder_rows_are_descriptive_train_rows(tmp_path):
    cfg = load_config(SynthMedJobConfig, TINY, ["synthmed.splits.instruct=40", f"output.path={tmp_path / 'o'}",
                                                "synthmed.prior.usual_side_train=0.8"])  # fmt: skip
    summary = generate_dataset(cfg)
    rows = read_table(tmp_path / "o" / "instruct").to_pylist()
    assert len(rows) == 40 == summary["splits"]["instruct"]["samples"]
    assert {r["split"] for r in rows} == {"train"} and {r["answer_type"] for r in rows} == {"report"}
    assert {r["question_type"] for r in rows} <= set(INSTRUCTION_TYPES)
    assert all(re.fullmatch(r"synthmed-instruct-\d{6}-q\d", r["id"]) for r in rows)
    for row in rows:
        sentences = [s for s in re.split(r"[.;:] ?", row["answer"]) if s]
        assert 1 <= len(sentences) <= 4, row["answer"]
        for f in row["findings"]:  # a describe / abnormal answer mentions each finding's kind
            if row["question_type"] in ("instruct_describe", "instruct_abnormal"):
                assert f["kind"] in row["answer"]


def test_scene_priors_at_zero_draw_the_same_world():
    for seed in range(50):
        plain = sample_scene(np.random.default_rng(seed))
        assert sample_scene(np.random.default_rng(seed), usual_side=0.0, companion=0.0) == plain


def _sides(split: str, cfg: SynthMedJobConfig, images: int = 600) -> float:
    found = [f for i in range(images) for f in scene_at(cfg.synthmed, split, i)[0].findings]
    return sum(f.position == USUAL_SIDE[f.kind] for f in found) / len(found)


def test_usual_side_prior_lives_in_the_train_world_only():
    cfg = load_config(SynthMedJobConfig, TINY, ["output.path=/nonexistent", "synthmed.prior.usual_side_train=0.8",
                                                "synthmed.prior.companion_train=1.0"])  # fmt: skip
    assert _sides("train", cfg) > 0.7 and _sides("instruct", cfg) > 0.7
    assert 0.15 < _sides("test", cfg) < 0.35  # uniform: 1 in 4
    with_mass = [s for i in range(400) for s in [scene_at(cfg.synthmed, "train", i)[0]] if "mass" in s.kinds()]
    companions = Counter("effusion" in s.kinds() for s in with_mass if len(s.findings) < 3)
    assert companions[True] > 0.9 * sum(companions.values())


@pytest.mark.parametrize("split", ["train", "test"])
def test_vqa_splits_keep_their_question_types(split):
    cfg = load_config(SynthMedJobConfig, TINY, ["output.path=/nonexistent", "synthmed.splits.instruct=8"])
    rows = image_samples(cfg.synthmed, split, 0, 4)
    assert not {r["question_type"] for r in rows} & set(INSTRUCTION_TYPES)
