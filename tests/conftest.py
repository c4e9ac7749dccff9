"""Shared fixtures: tiny models and datasets built in seconds (never downloaded, never the demo model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray token auth stays on in tests (core/runtime.py and core/ray_local.py write the tokens): an opt-out
# inherited from the shell would test a configuration the project never uses.
if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
    del os.environ["RAY_AUTH_MODE"]

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLES = REPO.parent / "shared" / "data" / "real_samples"

TINY_TEXTS = [
    "is there a nodule?", "is there a mass?", "is the nodule on the left?", "yes", "no",
    "what modality is this?", "ct", "mri", "x-ray", "where is the mass?", "left", "right", "upper", "lower",
    "describe the image.", "ct of the chest showing a nodule on the left.", "mri of the brain with no abnormality.",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny toy Med-VLM saved as a Hugging Face folder (about a second to build)."""
    from hscr_platform.models.toy import ToyModelConfig, create_toy_model

    cfg = ToyModelConfig(
        vocab_size=300, vision_hidden=32, vision_layers=1, vision_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64, max_positions=160,
    )  # fmt: skip
    return create_toy_model(cfg, TINY_TEXTS * 10, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def noise_images() -> list:
    """Two different 64×64 RGB noise images (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).convert("RGB") for _ in range(2)]
