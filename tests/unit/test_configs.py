"""The strict config loader, and every YAML profile under jobs/configs loading through it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from hscr_platform.core.config import ConfigError, config_hash, flatten, load_config, parse_override, save_config

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    kind: Literal["a", "b"] = "a"
    tags: tuple[str, ...] = ()
    path: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "name: x\ninner: {lr: 1}\n"), ["inner.steps=5", "inner.tags=[p, q]"])
    assert cfg == Outer(name="x", inner=Inner(lr=1.0, steps=5, tags=("p", "q")))
    assert isinstance(cfg.inner.lr, float)


def test_exponent_literals_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 3e-6 as the string "3e-6"; a float field takes it as the number (file and override alike)
    assert load_config(Outer, write(tmp_path, "name: x\ninner: {lr: 3e-6}\n")).inner.lr == 3e-6
    assert load_config(Outer, write(tmp_path, "name: x\n"), ["inner.lr=1E5"]).inner.lr == 1e5
    with pytest.raises(ConfigError, match=r"'inner\.lr' must be of type float"):
        load_config(Outer, write(tmp_path, "name: x\n"), ["inner.lr=3e-6x"])
    with pytest.raises(ConfigError, match="'name' must be of type str"):  # only float fields convert
        load_config(Outer, write(tmp_path, "name: 3\n"))


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("name: x\ninner: {lrr: 1}\n", [], "unknown key 'inner.lrr'"),
        ("name: x\n", ["inner.stepz=3"], "unknown key 'inner.stepz'"),
        ("name: x\ninner: {steps: ten}\n", [], "'inner.steps' must be of type int"),
        ("name: x\ninner: {steps: 0}\n", [], "bad value in 'inner': steps must be >= 1"),
        ("name: x\ninner: {kind: c}\n", [], "'inner.kind' must be one of ['a', 'b']"),
        ("name: x\nflag: 1\n", [], "'flag' must be true or false"),
        ("name: x\ninner: {steps: true}\n", [], "'inner.steps' must be a number"),
        ("inner: {}\n", [], "missing required key(s) ['name']"),
        ("name: x\ninner: 3\n", [], "'inner' must be a section"),
        ("- a\n", [], "top level must be a mapping"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_round_trip_hash_and_flatten(tmp_path):
    cfg = load_config(Outer, None, ["name=n", "inner.tags=[t]"])
    again = load_config(Outer, save_config(cfg, tmp_path / "saved.yaml"))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Outer, None, ["name=m"])) != config_hash(cfg)
    assert flatten(cfg)["inner.lr"] == 1e-3 and flatten(cfg)["inner.tags"] == ["t"]


# jobs/configs/<job>/<profile>.yaml -> the job's config class (module, class name).
JOB_CONFIGS = {
    "synthmed": ("hscr_platform.data.synthmed.job", "SynthMedJobConfig"),
    "ingest": ("hscr_platform.data.ingest", "IngestJobConfig"),
    "sft": ("hscr_platform.training.sft", "SftJobConfig"),
    "train": ("hscr_platform.training.job", "TrainJobConfig"),
    "generate": ("hscr_platform.generation.job", "GenerateJobConfig"),
    "pipeline": ("hscr_platform.pipeline", "PipelineConfig"),
    "evaluate": ("hscr_platform.evaluation.job", "EvaluateJobConfig"),
    "sweep": ("hscr_platform.sweep", "SweepJobConfig"),
    "convert": ("hscr_platform.models.convert", "ConvertJobConfig"),
}


def _profiles() -> list[Path]:
    return sorted((REPO / "jobs" / "configs").glob("*/*.yaml"))


def test_every_config_folder_is_known():
    folders = {p.parent.name for p in _profiles()}
    assert folders, "no job configs found"
    assert folders <= set(JOB_CONFIGS), f"add {sorted(folders - set(JOB_CONFIGS))} to JOB_CONFIGS"


@pytest.mark.parametrize("path", _profiles(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_profile_loads_strictly(path):
    module, name = JOB_CONFIGS[path.parent.name]
    cls = getattr(importlib.import_module(module), name)
    cfg = load_config(cls, path)
    assert config_hash(cfg)


@pytest.mark.parametrize("job", sorted({p.parent.name for p in _profiles()}))
def test_every_job_has_a_tiny_and_a_cluster_profile(job):
    names = {p.stem for p in (REPO / "jobs" / "configs" / job).glob("*.yaml")}
    assert {"tiny", "base"} <= names, f"jobs/configs/{job} needs tiny.yaml (tests) and base.yaml (cluster)"
