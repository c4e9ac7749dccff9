"""Multi-level DPO training (HSCR stage 3) on Ray Train + DeepSpeed.

python -m jobs.train --config jobs/configs/train/tiny.yaml data.path=<preference shards> policy.path=<model>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.training.job import run
from hscr_platform.training.train_config import TrainJobConfig


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(TrainJobConfig, run, prog="jobs.train", argv=argv)


if __name__ == "__main__":
    main()
