"""training: the Ray Train + DeepSpeed jobs. Multi-level DPO (``python -m jobs.train``: the job, the worker
loop, preference batches, the DeepSpeed config) and the SFT that builds the base Med-VLM (``jobs.sft``).

May import: core/, data/, models/ (and hscr). Never another stage.
"""
