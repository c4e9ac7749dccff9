"""Generate the SynthMed dataset: scans with exact ground truth, templated questions, a language prior.

python -m jobs.synthmed --config jobs/configs/synthmed/tiny.yaml output.path=/tmp/x
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.data.synthmed.job import SynthMedJobConfig, run


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(SynthMedJobConfig, run, prog="jobs.synthmed", argv=argv)


if __name__ == "__main__":
    main()
