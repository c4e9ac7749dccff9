"""Layout and import hygiene: the rules DESIGN.md sets, checked on the tree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_platform_folder_does_not_shadow_the_stdlib():
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform, uuid; print(platform.__file__); platform.system()"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert not out.stdout.strip().startswith(str(REPO)), out.stdout


def _imports(folder: Path) -> set[tuple[str, str]]:
    """(file, top-level module) for every import statement under a folder."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(REPO)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path.relative_to(REPO)), node.module.split(".")[0]))
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("hscr", {"ray", "vllm", "deepspeed", "mlflow", "transformers", "hscr_platform", "jobs", "pyarrow"}),
        ("platform", {"jobs"}),
    ],
)
def test_dependencies_point_one_way(folder, forbidden):
    bad = sorted((f, m) for f, m in _imports(REPO / folder) if m in forbidden)
    assert not bad, f"{folder}/ must not import {sorted(forbidden)}: {bad}"


def test_importing_hscr_and_configs_is_light():
    code = (
        "import sys, hscr, hscr.loss, hscr.rewards, hscr.metrics, hscr_platform.core.config, hscr_platform.data.schema;"
        "heavy = [m for m in ('ray', 'vllm', 'deepspeed', 'mlflow', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing hscr / the config loaded: {out.stdout.strip()}"


def test_every_job_module_is_thin_and_runnable():
    jobs = sorted(p for p in (REPO / "jobs").glob("*.py") if p.name != "__init__.py")
    assert jobs
    for job in jobs:
        lines = [ln for ln in job.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) <= 80, f"{job.name} has {len(lines)} lines: jobs are thin entry points"
        assert '__name__ == "__main__"' in job.read_text(), f"{job.name} cannot run as python -m"


def test_every_platform_subpackage_is_packaged():
    import tomllib

    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for init in (REPO / "platform").rglob("__init__.py"):
        rel = init.parent.relative_to(REPO / "platform")
        assert f"hscr_platform.{'.'.join(rel.parts)}" in packages, f"{init.parent} missing from pyproject"


# --- inside platform/: a stage uses the shared folders, never another stage -------------------------------------

SHARED = {"core": set(), "data": {"core"}, "models": {"core", "data"}}  # each may import only the folders listed
STAGES = {"generation", "training", "evaluation"}  # each may import core, data, models
COMPOSERS = {"sweep", "pipeline", "ablation", "bench"}  # these wire stages together and may import anything
# The one reasoned exception: generation's `model.from_sft_config` loads an SFT config (its class only) to find the
# model folder that config produces. Anything added here needs a reason as good.
ALLOWED = {("platform/generation/job.py", "training")}


def _platform_imports() -> list[tuple[str, str, str]]:
    """(file, the file's top folder under platform/, the hscr_platform folder it imports) for every import."""
    found = []
    for path in sorted((REPO / "platform").rglob("*.py")):
        rel = path.relative_to(REPO / "platform")
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = (
                    [node.module] if node.module != "hscr_platform" else [f"hscr_platform.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "hscr_platform" and len(parts) > 1 and parts[1] != owner:
                    found.append((str(path.relative_to(REPO)), owner, parts[1]))
    return found


def test_platform_has_one_folder_per_stage_and_no_loose_modules():
    loose = sorted(p.stem for p in (REPO / "platform").glob("*.py"))
    assert loose == ["ablation", "pipeline", "sweep"], f"top-level modules of platform/ are the composers only: {loose}"
    folders = {p.name for p in (REPO / "platform").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(SHARED) | STAGES | {"bench"}, folders
    for folder in folders:
        init = REPO / "platform" / folder / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) if init.exists() else None
        assert doc and "import" in doc, f"platform/{folder}/__init__.py must say what it owns and may import"


def test_stages_use_shared_folders_but_not_each_other():
    bad = []
    for file, owner, target in _platform_imports():
        if owner in COMPOSERS or (file, target) in ALLOWED:
            continue
        allowed = SHARED.get(owner, {"core", "data", "models"})
        if target not in allowed:
            bad.append(f"{file} ({owner}) imports hscr_platform.{target}")
    assert not bad, "platform/ layering broken:\n" + "\n".join(bad)


def test_the_layering_check_sees_a_violation(tmp_path, monkeypatch):
    """The rule above would fail on a stage importing another stage (a test that can fail)."""
    fake = tmp_path / "platform" / "training"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from hscr_platform.generation.scoring import score_example\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _platform_imports() == [("platform/training/x.py", "training", "generation")]
