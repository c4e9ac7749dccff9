"""Benchmarks that write JSON, never timed tests: ``python -m jobs.benchmark <name>|all --output DIR``.

    python -m jobs.benchmark train --output runs/bench toy_iters=20   # -> runs/bench/train.json
    python -m jobs.benchmark scale --rows 10000 50000 100000          # about an hour on 2 CPUs
    python -m jobs.benchmark badinput                                 # 10k rows, 1% bad, driver killed once

``all`` runs the speed benchmarks (train, generate); the end-to-end runs (scale, badinput) only by name.

Each entry is a module with a config class and ``run(cfg) -> dict``; add one by adding a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hscr_platform.core.cli import apply_env_defaults
from hscr_platform.core.config import load_config

# name -> (module, config class)
BENCHMARKS = {
    "train": ("hscr_platform.bench.train", "TrainBenchConfig"),
    "generate": ("hscr_platform.bench.generate", "GenerateBenchConfig"),
    "scale": ("hscr_platform.bench.scale", "ScaleBenchConfig"),
    "badinput": ("hscr_platform.bench.badinput", "BadInputBenchConfig"),
}
IN_ALL = ("train", "generate")


def run_one(name: str, output: Path, config: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    module_name, class_name = BENCHMARKS[name]
    module = importlib.import_module(module_name)
    result = module.run(load_config(getattr(module, class_name), config, overrides))
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return dict(result)


def split_rows(values: Sequence[str]) -> tuple[list[int], list[str]]:
    """--rows takes numbers; key=value words after it are overrides that its nargs="+" swallowed."""
    bad = [v for v in values if "=" not in v and not v.isdigit()]
    if bad:
        raise SystemExit(f"--rows takes whole numbers, got {bad}")
    return [int(v) for v in values if "=" not in v], [v for v in values if "=" in v]


def rows_override(name: str, rows: Sequence[int] | None) -> list[str]:
    """``--rows``: a list of sizes for scale, one size for badinput."""
    if not rows:
        return []
    if name == "badinput":
        if len(rows) != 1:
            raise SystemExit(f"badinput takes one --rows value, got {list(rows)}")
        return [f"rows={rows[0]}"]
    return [f"rows=[{','.join(map(str, rows))}]"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="jobs.benchmark", description="Run benchmarks, write JSON.")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--output", default="runs/bench", help="folder for <name>.json")
    parser.add_argument("--config", help="YAML of the benchmark's config (defaults otherwise)")
    parser.add_argument("--rows", nargs="+", default=[], help="scale / badinput: input sizes (the rows key)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of that config")
    args = parser.parse_intermixed_args(argv)
    args.rows, swallowed = split_rows(args.rows)
    args.overrides += swallowed
    apply_env_defaults()
    results = {}
    for name in IN_ALL if args.name == "all" else [args.name]:
        try:
            overrides = [*args.overrides, *rows_override(name, args.rows)]
            results[name] = run_one(name, Path(args.output), args.config, overrides)
        except ModuleNotFoundError as exc:  # an entry whose module is not written yet
            if args.name != "all" or exc.name != BENCHMARKS[name][0]:
                raise
            print(f"[benchmark] {name}: skipped ({exc.name} is not available)", flush=True)
    return results


if __name__ == "__main__":
    main()
