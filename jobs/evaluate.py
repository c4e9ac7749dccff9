"""Evaluate several Med-VLMs on one test set (Ray Data batch inference, metrics, comparison table, MLflow).

python -m jobs.evaluate --config jobs/configs/evaluate/tiny.yaml models='{a: <folder>, b: <folder>}'
"""

from hscr_platform.core.cli import job_main
from hscr_platform.evaluation.job import EvaluateJobConfig, run

if __name__ == "__main__":
    job_main(EvaluateJobConfig, run, prog="jobs.evaluate")
