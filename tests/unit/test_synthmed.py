"""SynthMed: determinism, the schema, distinct modalities, visible findings, the prior, consistent answers."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hscr_platform.core.config import ConfigError, load_config
from hscr_platform.core.io import read_table, shard_files
from hscr_platform.data.schema import ANSWER_TYPES, SAMPLE_SCHEMA
from hscr_platform.data.synthmed.job import (
    SynthMedConfig,
    SynthMedJobConfig,
    generate_dataset,
    generate_split,
    image_samples,
)
from hscr_platform.data.synthmed.questions import (
    NUMBER,
    PLURAL,
    QUESTION_TYPES,
    questions_for_scene,
    report_sentence,
)
from hscr_platform.data.synthmed.render import (
    KINDS,
    MODALITIES,
    MODALITY_NAME,
    Finding,
    Scene,
    Style,
    render_scene,
    sample_scene,
)
from jobs.synthmed import main as job_main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "synthmed" / "tiny.yaml"


def tiny(**overrides: object) -> SynthMedJobConfig:
    return load_config(SynthMedJobConfig, TINY, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthmed") / "out"
    return root, generate_dataset(tiny(**{"output.path": root}))


def _rows(root: Path) -> list[dict]:
    return [row for split in ("train", "validation", "test") for row in read_table(root / split).to_pylist()]


# --- determinism and layout ------------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_images():
    cfg = tiny().synthmed
    assert image_samples(cfg, "train", 5, 4) == image_samples(cfg, "train", 5, 4)
    other = image_samples(dataclasses.replace(cfg, seed=1), "train", 5, 4)
    assert other[0]["image"] != image_samples(cfg, "train", 5, 4)[0]["image"]
    assert image_samples(cfg, "test", 5, 4)[0]["image"] != image_samples(cfg, "train", 5, 4)[0]["image"]


def test_one_or_two_workers_write_identical_shards(tmp_path):
    cfg = dataclasses.replace(tiny().synthmed, rows_per_shard=16)  # 120 train rows -> 8 shards
    one = generate_split(cfg, "train", tmp_path / "one")
    two = generate_split(dataclasses.replace(cfg, workers=2), "train", tmp_path / "two")
    assert one == two
    files_one, files_two = shard_files(tmp_path / "one"), shard_files(tmp_path / "two")
    assert [f.name for f in files_one] == [f"part-{i:05d}.parquet" for i in range(8)]
    assert [f.name for f in files_two] == [f.name for f in files_one]
    assert read_table(tmp_path / "one").equals(read_table(tmp_path / "two"))


def test_layout_schema_and_summary(tiny_dataset):
    root, summary = tiny_dataset
    assert (root / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((root / "summary.json").read_text())["samples"] == 200 == summary["samples"]
    for split, expected in {"train": 120, "validation": 40, "test": 40}.items():
        table = read_table(root / split)
        assert pq.read_schema(shard_files(root / split)[0]) == SAMPLE_SCHEMA
        assert table.num_rows == expected == summary["splits"][split]["samples"]
        assert set(table.column("split").to_pylist()) == {split}
    rows = _rows(root)
    assert len({r["id"] for r in rows}) == len(rows)
    assert re.fullmatch(r"synthmed-train-000000-q0", rows[0]["id"])
    for row in rows:
        assert row["source"] == "synthmed" and row["answer_type"] in ANSWER_TYPES
        assert row["question_type"] in QUESTION_TYPES and row["modality"] in MODALITIES
        assert json.loads(row["meta"])["image_index"] == int(row["id"].split("-")[2])
    image = Image.open(io.BytesIO(rows[0]["image"]))
    assert (image.mode, image.size) == ("L", (64, 64))


def test_last_image_gets_the_remaining_questions():
    cfg = tiny(**{"synthmed.splits.train": 10}).synthmed
    assert [len(image_samples(cfg, "train", i, min(4, 10 - 4 * i))) for i in range(3)] == [4, 4, 2]


def test_refuses_a_non_empty_output_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty.*output\.overwrite=true"):
        generate_dataset(tiny(**{"output.path": tmp_path, "synthmed.splits.train": 8}))
    with pytest.raises(SystemExit) as exit_info:  # the job turns it into one line and exit status 2
        job_main(["--config", str(TINY), f"output.path={tmp_path}"])
    assert exit_info.value.code == 2 and "overwrite" in capsys.readouterr().err
    small = {"output.path": tmp_path, "synthmed.splits.train": 8, "synthmed.splits.test": 4}
    generate_dataset(tiny(**small, **{"output.overwrite": True}))
    assert (tmp_path / "keep.txt").read_text() == "mine"  # only SynthMed's own files are replaced
    assert read_table(tmp_path / "train").num_rows == 8


# --- the images ----------------------------------------------------------------------------------


def _scene(modality: str, organ: str, findings: tuple[Finding, ...] = (), seed: int = 0) -> Scene:
    style = Style(cx=0.5, cy=0.5, scale=1.0, gain=1.0, offset=0.0, gamma=1.0, noise=1.0, texture_seed=seed)
    return Scene(modality=modality, organ=organ, findings=findings, style=style)


def test_each_modality_has_its_own_look():
    images = {m: np.stack([render_scene(_scene(m, "abdomen", seed=s)) for s in range(4)]) for m in MODALITIES}
    images = {m: im.astype(float) for m, im in images.items()}  # (4, 64, 64) each
    hists = {m: np.histogram(im, bins=16, range=(0, 256))[0] / im.size for m, im in images.items()}
    for a, b in [("ct", "mri"), ("ct", "xray"), ("mri", "xray")]:
        assert np.abs(hists[a] - hists[b]).sum() > 0.3, (a, b)
    # MRI is blurred (least high-frequency energy); X-ray fills the frame (little black air around the body)
    laplacian = {m: np.abs(im[:, 1:-1, 1:-1] * 4 - im[:, 2:, 1:-1] - im[:, :-2, 1:-1] - im[:, 1:-1, 2:]
                           - im[:, 1:-1, :-2]).mean() for m, im in images.items()}  # fmt: skip
    assert laplacian["mri"] < 0.8 * min(laplacian["ct"], laplacian["xray"])
    dark = {m: (im < 20).mean() for m, im in images.items()}
    assert dark["xray"] < 0.5 * min(dark["ct"], dark["mri"])


def _one_finding_scene(modality: str, kind: str) -> Scene:
    for seed in range(1000):
        scene = sample_scene(np.random.default_rng(seed), max_findings=1, normal_fraction=0.0)
        if scene.modality == modality and scene.findings[0].kind == kind:
            return scene
    raise AssertionError("no such scene")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_finding_changes_pixels_only_where_it_is(modality, kind):
    scene = _one_finding_scene(modality, kind)
    finding = scene.findings[0]
    with_it = render_scene(scene).astype(int)
    without = render_scene(dataclasses.replace(scene, findings=())).astype(int)
    ys, xs = np.mgrid[0:64, 0:64]
    distance = np.hypot((xs + 0.5) / 64 - finding.x, (ys + 0.5) / 64 - finding.y)
    changed = np.abs(with_it - without) > 40
    assert changed[distance < max(finding.size, 0.04)].sum() >= 4, "the finding is not visible at its place"
    far = 0.4 if kind == "effusion" else 1.3 * finding.size + 0.05  # an effusion is a crescent along the wall
    assert not changed[distance > far].any(), "pixels far from the finding changed"


def test_sampled_findings_respect_positions_and_do_not_overlap():
    for seed in range(300):
        scene = sample_scene(np.random.default_rng(seed), max_findings=3)
        assert len({f.position for f in scene.findings}) == len(scene.findings) <= 3
        for f in scene.findings:
            dx, dy = f.x - scene.style.cx, f.y - scene.style.cy
            side = {"left": -dx, "right": dx, "upper": -dy, "lower": dy}[f.position]
            assert side > abs(dy if f.position in ("left", "right") else dx), f  # inside its wedge


# --- questions, answers and the prior -------------------------------------------------------------


def _yes_rates(cfg: SynthMedConfig, split: str, images: int = 4000) -> dict[str, float]:
    yes: dict[str, list[bool]] = {"presence": [], "position": []}
    for i in range(images):
        rng = np.random.default_rng([cfg.seed, 9, i])
        scene = sample_scene(rng, max_findings=cfg.max_findings, normal_fraction=cfg.normal_fraction)
        for q in questions_for_scene(scene, rng=rng, cfg=cfg, split=split):
            if q.question_type in yes:
                yes[q.question_type].append(q.answer == "yes")
    return {k: float(np.mean(v)) for k, v in yes.items()}


@pytest.mark.parametrize("prior", [0.9, 0.7])
def test_realised_train_yes_rate_matches_the_prior(prior):
    rates = _yes_rates(tiny(**{"synthmed.prior.presence_yes_train": prior}).synthmed, "train")
    assert abs(rates["presence"] - prior) < 0.02 and abs(rates["position"] - 0.5) < 0.03


def test_test_split_is_balanced_whatever_the_prior():
    rates = _yes_rates(tiny(**{"synthmed.prior.presence_yes_train": 0.9}).synthmed, "test")
    assert abs(rates["presence"] - 0.5) < 0.02 and abs(rates["position"] - 0.5) < 0.03


def test_answers_agree_with_the_findings(tiny_dataset):
    for row in _rows(tiny_dataset[0]):
        q, answer, findings = row["question"], row["answer"], row["findings"]
        kinds = [f["kind"] for f in findings]
        if m := re.fullmatch(r"how many (\w+) are there\?", q):
            kind = next(k for k, plural in PLURAL.items() if plural == m.group(1))
            assert answer == NUMBER[kinds.count(kind)], row
        elif m := re.fullmatch(r"(?:is there|does the image show|is|can you see) an? (\w+)(?: present)?\?", q):
            assert answer == ("yes" if m.group(1) in kinds else "no"), row
        elif m := re.fullmatch(r"where is the (\w+)\?", q):
            assert kinds.count(m.group(1)) == 1
            assert answer == next(f["position"] for f in findings if f["kind"] == m.group(1))
        elif m := re.fullmatch(r"is the (\w+) (?:located )?(?:on the|in the) (\w+)(?: part)?\?", q):
            truth = next(f["position"] for f in findings if f["kind"] == m.group(1))
            assert answer == ("yes" if truth == m.group(2) else "no"), row
        elif q == "what abnormality is seen?":
            assert answer == "no abnormality" if not kinds else set(re.split(r", | and ", answer)) == set(kinds)
        elif m := re.fullmatch(r"is this an? (ct|mri|x-ray)(?: scan)?\?", q):
            assert answer == ("yes" if m.group(1) == MODALITY_NAME[row["modality"]] else "no"), row
        elif q == "what modality is this?":
            assert answer == MODALITY_NAME[row["modality"]]
        elif q == "which organ is shown?":
            assert answer == row["organ"]
        elif q == "describe the image.":
            assert answer.startswith(MODALITY_NAME[row["modality"]])
            assert all(kind in answer for kind in kinds) and ("no abnormality" in answer) == (not kinds)


def test_report_sentence_examples():
    nodule = Finding(kind="nodule", position="left", size=0.04, x=0.3, y=0.5)
    mass = Finding(kind="mass", position="right", size=0.08, x=0.7, y=0.5)
    effusion = Finding(kind="effusion", position="lower", size=0.05, x=0.5, y=0.8)
    assert report_sentence(_scene("ct", "chest", (mass, nodule))) == (
        "ct of the chest showing a nodule on the left and a mass on the right."
    )
    assert report_sentence(_scene("xray", "chest", (effusion,))) == (
        "x-ray of the chest showing an effusion in the lower part."
    )
    assert report_sentence(_scene("mri", "brain")) == "mri of the brain with no abnormality."


def test_questions_about_one_image_are_distinct():
    cfg = tiny(**{"synthmed.questions_per_image": 8}).synthmed
    for seed in range(300):
        rng = np.random.default_rng(seed)
        questions = questions_for_scene(sample_scene(rng), rng=rng, cfg=cfg, split="train")
        assert len({q.question for q in questions}) == 8


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("synthmed.prior.presence_yes_train=1.5", "presence_yes_train must be in [0, 1]"),
        ("synthmed.prior.position_yes_train=-0.1", "position_yes_train must be in [0, 1]"),
        ("synthmed.max_findings=4", "max_findings must be in [1, 3]"),
        ("synthmed.splits.test=-1", "test must be >= 0"),
        ("synthmed.workers=0", "workers must be >= 1"),
        ("synthmed.rows_per_shard=2", "rows_per_shard (2) must be >= questions_per_image"),
        ("synthmed.question_mix.presence=-1", "question weights must be >= 0"),
        ("synthmed.normal_fraction=1.0", "normal_fraction must be in [0, 1)"),
        ("synthmed.prior.presense_yes_train=0.5", "unknown key 'synthmed.prior.presense_yes_train'"),
    ],
)
def test_bad_configs_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(SynthMedJobConfig, TINY, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs" / "synthmed").glob("*.yaml")), ids=str)
def test_profiles_load(path):
    cfg = load_config(SynthMedJobConfig, path)
    assert path.read_text().startswith("# "), "each profile starts with a one-line comment"
    total = cfg.synthmed.splits.train + cfg.synthmed.splits.validation + cfg.synthmed.splits.test
    expected = {"tiny": (200, 1), "demo": (20_000, 2), "base": (1_000_000, 16)}[path.stem]
    assert (total, cfg.synthmed.workers) == expected
