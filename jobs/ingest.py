"""Ingest a dataset into samples/ + rejects/ parquet datasets (see docs/DATA.md).

    python -m jobs.ingest --config jobs/configs/ingest/tiny.yaml source.format=slake \
        source.path=../shared/data/real_samples/slake output.path=runs/ingest/slake
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.data.ingest import IngestJobConfig, run


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(IngestJobConfig, run, prog="jobs.ingest", argv=argv)


if __name__ == "__main__":
    main()
