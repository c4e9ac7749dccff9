"""Export preference shards to TRL's preference format or LLaVA-style JSON (see platform/data/export.py).

python -m jobs.export input=<generate output>/preferences format=trl output=<dir> [pairs=all]
python -m jobs.export input=<generate output>/preferences format=llava output=<dir>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.data.export import ExportJobConfig, run


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(ExportJobConfig, run, prog="jobs.export", argv=argv)


if __name__ == "__main__":
    main()
