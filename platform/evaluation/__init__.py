"""evaluation: the comparison job (``python -m jobs.evaluate``). Answers a test split with several models on Ray
Data (through models/answering), computes the Med-VQA metrics and writes the report, JSON and plots.

May import: core/, data/, models/ (and hscr). Never another stage.
"""
