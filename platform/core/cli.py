"""The one way jobs start: ``python -m jobs.<name> --config <yaml> key=value ...``.

The same command runs unchanged under ``ray job submit --working-dir . -- python -m jobs.<name> ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hscr_platform.core.config import ConfigError, load_config

C = TypeVar("C")

# Quiet, offline, fair-to-neighbours defaults for every job (a user's own environment wins).
_ENV_DEFAULTS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # busy-waiting OpenMP threads collapse throughput when a core is shared
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # never reach for a hub at run time
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def parse_job_args(cls: type[C], argv: Sequence[str] | None, *, prog: str) -> C:
    """Parse ``--config PATH [key=value ...]`` into a validated config (exit 2 with the reason if invalid)."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--config", help="YAML config (e.g. jobs/configs/<job>/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        print(f"{prog}: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def job_main(cls: type[C], run: Callable[[C], Any], *, prog: str, argv: Sequence[str] | None = None) -> Any:
    """Entry point of every job: env defaults, config, run. User errors exit 2 with one clear line."""
    apply_env_defaults()
    cfg = parse_job_args(cls, argv, prog=prog)
    try:
        return run(cfg)
    except ConfigError as exc:  # e.g. a pipeline stage's profile + overrides
        print(f"{prog}: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        if os.environ.get("HSCR_TRACEBACK"):
            raise
        print(f"{prog}: error: {exc} (set HSCR_TRACEBACK=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
