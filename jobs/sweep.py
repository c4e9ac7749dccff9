"""Sweep the preference-level weights, gamma and the learning rate with Ray Tune (ASHA), tracked in MLflow.

python -m jobs.sweep --config jobs/configs/sweep/demo.yaml
"""

from hscr_platform.core.cli import job_main
from hscr_platform.sweep import SweepJobConfig, run

if __name__ == "__main__":
    job_main(SweepJobConfig, run, prog="jobs.sweep")
