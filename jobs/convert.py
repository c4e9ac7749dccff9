"""Convert an original-layout LLaVA / LLaVA-Med checkpoint to a llava-hf folder (see platform/models/convert.py).

python -m jobs.convert --config jobs/configs/convert/base.yaml source.path=<llava-med-v1.5-mistral-7b> \
    source.vision_tower=<clip-vit-large-patch14-336> output.path=<llava-med-v1.5-hf>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hscr_platform.core.cli import job_main
from hscr_platform.models.convert import ConvertJobConfig, run


def main(argv: Sequence[str] | None = None) -> Any:
    return job_main(ConvertJobConfig, run, prog="jobs.convert", argv=argv)


if __name__ == "__main__":
    main()
