"""The main job: SynthMed -> base model -> ... -> report, each stage cached by config hash (`make demo`).

python -m jobs.pipeline --config jobs/configs/pipeline/demo.yaml
"""

from hscr_platform.core.cli import job_main
from hscr_platform.pipeline import PipelineConfig, run

if __name__ == "__main__":
    job_main(PipelineConfig, run, prog="jobs.pipeline")
