"""SynthMed: the generated Med-VQA world. ``render`` draws scenes, ``questions`` asks about them, ``job`` writes
the parquet splits (``python -m jobs.synthmed``). Pure numpy: no torch, no Ray outside the job's driver.
"""
