"""Stage outputs keyed by config hash: a stage whose folder is complete for the same config is skipped."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from hscr_platform.core.config import config_hash, save_config, to_dict

DONE_MARKER = "_SUCCESS"


def stage_dir(root: str | Path, stage: str, cfg: Any) -> Path:
    """``<root>/<stage>/<config hash>``: where a stage run with exactly this config keeps its outputs."""
    return Path(root) / stage / config_hash(cfg)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


def mark_complete(folder: str | Path, cfg: Any, **summary: Any) -> None:
    """Save the resolved config and a summary, then the marker (last, so a crash leaves it incomplete)."""
    folder = Path(folder)
    save_config(cfg, folder / "config.yaml")
    record = {"config_hash": config_hash(cfg), "finished_at": time.time(), **summary}
    (folder / "summary.json").write_text(json.dumps(record, indent=2, default=str))
    (folder / DONE_MARKER).write_text(json.dumps(to_dict(cfg), sort_keys=True))


def read_summary(folder: str | Path) -> dict[str, Any]:
    return dict(json.loads((Path(folder) / "summary.json").read_text()))


def reset(folder: str | Path) -> Path:
    """Remove an incomplete stage folder so that the stage starts clean."""
    folder = Path(folder)
    if folder.exists() and not is_complete(folder):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
