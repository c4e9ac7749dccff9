"""core: what every stage shares. The strict config loader, the command line, Ray start-up (a cluster under
``ray job submit``, or a private local head), MLflow tracking, the stage cache, parquet shard I/O and plots.

May import: hscr and third-party libraries only, never another folder of hscr_platform.
"""
