"""Generate HSCR preference data (stages 1 + 2) on Ray Data; resumable, see platform/generation/job.py.

python -m jobs.generate --config jobs/configs/generate/tiny.yaml data.input=<samples dir> output.path=<dir>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.generation.job import GenerateJobConfig, run


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(GenerateJobConfig, run, prog="jobs.generate", argv=argv)


if __name__ == "__main__":
    main()
