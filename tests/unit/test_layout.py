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
        "import sys, hscr, hscr.loss, hscr.rewards, hscr.metrics, hscr_platform.config, hscr_platform.schema;"
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
