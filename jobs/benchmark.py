"""Benchmarks that write JSON, never timed tests: ``python -m jobs.benchmark <name>|all --output DIR``.

    python -m jobs.benchmark train --output runs/bench toy_iters=20   # -> runs/bench/train.json

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
}


def run_one(name: str, output: Path, config: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    module_name, class_name = BENCHMARKS[name]
    module = importlib.import_module(module_name)
    result = module.run(load_config(getattr(module, class_name), config, overrides))
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return dict(result)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="jobs.benchmark", description="Run benchmarks, write JSON.")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--output", default="runs/bench", help="folder for <name>.json")
    parser.add_argument("--config", help="YAML of the benchmark's config (defaults otherwise)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of that config")
    args = parser.parse_intermixed_args(argv)
    apply_env_defaults()
    results = {}
    for name in BENCHMARKS if args.name == "all" else [args.name]:
        try:
            results[name] = run_one(name, Path(args.output), args.config, args.overrides)
        except ModuleNotFoundError as exc:  # an entry whose module is not written yet
            if args.name != "all" or exc.name != BENCHMARKS[name][0]:
                raise
            print(f"[benchmark] {name}: skipped ({exc.name} is not available)", flush=True)
    return results


if __name__ == "__main__":
    main()
