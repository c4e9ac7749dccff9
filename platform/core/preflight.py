"""Check before work: everything a run needs is checked before its first stage starts, in one pass.

A pipeline that cannot run must say so before it writes anything, and say *everything* that is wrong, not the
first problem of many after an hour of work. A run's checks are ``(what, check)`` pairs: ``check`` is a
function that raises (FileNotFoundError, ValueError, ConnectionError, ...) with a message naming the problem.
``require`` runs all of them and raises one ``PreflightError`` listing every failure:

    require([("sft: init.pretrained", lambda: check_vlm_folder(path)),
             ("tracking_uri", lambda: check_tracking_server(uri)),
             ("ray.address", lambda: check_ray_address(address))], job="pipeline")

    pipeline: error: 3 problems found before any work started:
      - sft: init.pretrained: model folder /mnt/shared/models/llava-med-v1.5-mistral-7b-hf does not exist
      - tracking_uri: the tracking server http://mlflow:5000 does not answer (...)
      - ray.address: 'auto', but no Ray cluster is running here (...)

This module holds the generic checks (paths, output folders, the tracking server, the Ray address) and the
ones that read a stage config's usual fields (``stage_checks``); model-folder checks are passed in by the
caller (``check_model``, e.g. ``models.loading.check_vlm_folder``: core imports nothing else of the platform).
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Check = tuple[str, Callable[[], object]]  # (what is checked, a function that raises if it is wrong)
RAY_DEFAULT_TEMP = Path("/tmp/ray")  # where `ray start` writes ray_current_cluster (what address "auto" reads)
TIMEOUT_S = 5.0  # network checks: a server that does not answer in this long counts as not reachable


@dataclass(frozen=True)
class Problem:
    """One thing that would make the run fail: what was checked, and why it failed."""

    what: str
    detail: str


class PreflightError(ValueError):
    """Every problem found before a run started (a ValueError: jobs exit 2 with the message)."""

    def __init__(self, job: str, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = [f"  - {p.what}: {p.detail}" for p in self.problems]
        count = f"{len(lines)} problem{'s' if len(lines) != 1 else ''}"
        super().__init__(f"{job}: {count} found before any work started:\n" + "\n".join(lines))


def collect(checks: Iterable[Check]) -> list[Problem]:
    """Run every check (a failing one does not stop the others); the problems in order, one per distinct
    message (stages that share a Ray address or a tracking server get one line naming them all)."""
    found: dict[str, list[str]] = {}  # message -> what failed with it, in order
    for what, check in checks:
        try:
            check()
        except Exception as exc:  # any failure is a problem to list; the check's message names it
            found.setdefault(str(exc) or type(exc).__name__, []).append(what)
    return [Problem(", ".join(dict.fromkeys(whats)), detail) for detail, whats in found.items()]


def require(checks: Iterable[Check], *, job: str) -> None:
    """Raise one PreflightError listing every failed check; return quietly when all pass."""
    problems = collect(checks)
    if problems:
        raise PreflightError(job, problems)


# --- generic checks ----------------------------------------------------------------------------------------


def check_exists(path: str | Path, kind: str = "input") -> Path:
    """``path`` exists (a file or a folder), else FileNotFoundError naming it and what it is."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    return Path(path)


def check_writable(path: str | Path) -> None:
    """``path`` can be created or written: its nearest existing ancestor is a writable folder."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create or write {path}: {existing} is not writable")


def check_tracking_server(uri: str | None, *, timeout_s: float = TIMEOUT_S) -> None:
    """An MLflow tracking URI is usable: an http(s) server answers; a sqlite / file store can be written."""
    if not uri:
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered: a server is there (MLflow serves /health; others may not)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"the tracking server {uri} does not answer ({reason})") from None
    if uri.startswith("sqlite:///"):
        check_writable(Path(uri.removeprefix("sqlite:///")).parent)
    elif uri.startswith("file:") or "://" not in uri:
        check_writable(uri.removeprefix("file://").removeprefix("file:"))


def _tcp(host_port: str, *, timeout_s: float) -> None:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{host_port!r} is not host:port")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def check_ray_address(address: str | None, *, timeout_s: float = TIMEOUT_S, temp_dir: Path = RAY_DEFAULT_TEMP) -> None:
    """The Ray cluster a job will join answers; None / "local" (a new local instance) needs nothing.

    None joins RAY_ADDRESS when it is set (``ray job submit`` sets it), like ``runtime.init_ray``. "auto"
    reads RAY_ADDRESS, else the ``ray_current_cluster`` file of ``temp_dir``, as Ray does.
    """
    resolved = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS") or address
    if resolved in (None, "local"):
        return
    if resolved == "auto":
        current = temp_dir / "ray_current_cluster"
        if not current.is_file():
            raise ConnectionError(
                f"'auto', but no Ray cluster is running here (RAY_ADDRESS is unset and there is no {current}): "
                "submit the job to a cluster with `ray job submit`, or set ray.address=null for a local instance"
            )
        resolved = current.read_text().strip()
    target = str(resolved).removeprefix("ray://").removeprefix("http://").removeprefix("https://").split("/")[0]
    try:
        _tcp(target, timeout_s=timeout_s)
    except OSError as exc:
        raise ConnectionError(f"the Ray cluster at {resolved} does not answer ({exc})") from None


# --- a stage config's usual fields ---------------------------------------------------------------------------


def _paths(value: Any) -> list[str]:
    """A path field's paths: one string, a list of them, or a name -> path mapping."""
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)]
    if isinstance(value, dict):
        return [str(v) for v in value.values() if v is not None]
    return [str(v) for v in value if v is not None]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


# stage config fields that name model folders / input data, by job (the fields each job's config class has)
MODEL_FIELDS = {
    "sft": ("init.pretrained",),
    "generate": ("model.path",),
    "train": ("policy.path", "reference.path"),
    "evaluate": ("models",),
}
INPUT_FIELDS = {
    "sft": ("data.train", "data.eval", "data.instruct"),
    "generate": ("data.input", "similarity.model"),
    "train": ("data.path",),
    "evaluate": ("data.path",),
}


def stage_checks(
    job: str,
    cfg: Any,
    *,
    check_model: Callable[[str], object],
    produced: Sequence[str | Path] = (),
    label: str | None = None,
) -> list[Check]:
    """The checks of one job's config: its model folders (``check_model``), inputs, tracking server, Ray address.

    ``job`` is the job's name (sft / generate / train / evaluate; ``label`` names it in messages, e.g. "dpo").
    Paths under a ``produced`` folder are made by an earlier stage of the same run and are not checked.
    """
    name = label or job
    made = [Path(p).absolute() for p in produced]

    def upstream(path: str) -> bool:
        return any(Path(path).absolute().is_relative_to(folder) for folder in made)

    checks: list[Check] = []
    for key in MODEL_FIELDS.get(job, ()):
        for path in _paths(_get(cfg, key)):
            if not upstream(path):
                checks.append((f"{name}: {key}", functools.partial(check_model, path)))
    for key in INPUT_FIELDS.get(job, ()):
        for path in _paths(_get(cfg, key)):
            if not upstream(path):
                checks.append((f"{name}: {key}", functools.partial(check_exists, path, key.split(".")[-1])))
    uri = _get(cfg, "tracking.uri") if _get(cfg, "tracking.enabled") is not False else None
    if uri:
        checks.append((f"{name}: tracking.uri", lambda: check_tracking_server(uri)))
    if _get(cfg, "ray") is not None:
        checks.append((f"{name}: ray.address", lambda: check_ray_address(_get(cfg, "ray.address"))))
    return checks


def pipeline_checks(
    cfg: Any, stages: Any, *, tracking_uri: str | None, check_model: Callable[[str], object]
) -> list[Check]:
    """A pipeline run's checks: its root, tracking store and Ray address, then every stage's external inputs.

    ``cfg`` is the PipelineConfig and ``stages`` its resolved Plan; everything under ``cfg.root`` is made by
    the run itself (SynthMed, the base model, the preference data) and is not checked.
    """
    checks: list[Check] = [
        ("root", lambda: check_writable(cfg.root)),
        ("tracking_uri", lambda: check_tracking_server(tracking_uri)),
        ("ray.address", lambda: check_ray_address(cfg.ray.address)),
    ]
    jobs = (("sft", "sft"), ("generate", "generate"), ("train", "train"), ("train", "dpo"), ("evaluate", "evaluate"))
    for job, label in jobs:
        stage = getattr(stages, label, None)
        if stage is not None:
            checks += stage_checks(job, stage, check_model=check_model, produced=[cfg.root], label=label)
    return checks
