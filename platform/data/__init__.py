"""data: samples in and preferences out. The sample / preference / reject schemas and their checks, the readers
of public formats (VQA-RAD, SLAKE, PathVQA, LLaVA-Med, parquet, JSONL), the ingest job, the export job (TRL,
LLaVA JSON), and SynthMed, the generated world whose answers are known.

May import: core/ (and hscr). Never models/ or a stage: data stays model-free.
"""
