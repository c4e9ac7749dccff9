"""generation: HSCR stages 1 + 2 (``python -m jobs.generate``). The job (config, driver, resume), the Ray Data
graph (chunks, commit, summary), the worker (score, replace, decode, re-rank, reference log-probs), the two-view
logit-shift scoring, the similarity re-ranker, and the HTML reward view.

May import: core/, data/, models/ (and hscr). Never another stage.
"""
