"""bench: the speed benchmarks (``python -m jobs.benchmark``), each against a naive baseline in the same run.

May import anything in hscr_platform: a benchmark drives a stage's internals.
"""
