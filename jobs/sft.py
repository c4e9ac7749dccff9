"""Train the base Med-VLM (the toy one on SynthMed by default) on Ray Train.

python -m jobs.sft --config jobs/configs/sft/tiny.yaml data.train=<samples>/train data.eval=<samples>/test
"""

from hscr_platform.core.cli import job_main
from hscr_platform.training.sft import SftJobConfig, run

if __name__ == "__main__":
    job_main(SftJobConfig, run, prog="jobs.sft")
