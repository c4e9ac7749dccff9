"""What vLLM needs around it that is not vLLM: torchvision importable next to CPU torch (the CPU test tier), and
model folders whose CLIP tower keys vLLM's LLaVA loader recognises (transformers >= 5 checkpoints).

Used by ``hscr_platform.models.engines.vllm`` (which re-exports these names) and by the ``.pth`` hook that
scripts/setup_vllm_cpu.sh puts into .venv-vllm. Importing this module imports neither torch nor vllm.
"""

from __future__ import annotations

import fcntl
import importlib.abc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# --- CPU tier: CUDA-linked torchvision next to CPU torch -----------------------------------------------

_TORCHVISION_STUB_OPS = ("nms", "qnms")  # the ops torchvision registers fake kernels for at import time
_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when its C++ extension cannot load (call before importing vllm).

    torchvision registers fake (meta) kernels for ``torchvision::nms`` and ``qnms`` when it is imported; if
    its ``_C`` library fails to load (PyPI's CUDA build next to CPU torch) those ops do not exist and the
    import raises ``operator torchvision::nms does not exist``. Defining the two schemas (no kernels) lets
    the import succeed; nothing in the LLaVA path calls them. Does nothing when torchvision is absent,
    already imported, or its extension loads (a matching build: GPU machines).
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if _torchvision_extension_loads(torch):
        return
    for op in _TORCHVISION_STUB_OPS:
        if not hasattr(torch.ops.torchvision, op):  # defined once per process
            torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)


def _torchvision_extension_loads(torch: Any) -> bool:
    """Whether torchvision's ``_C`` library loads (found without importing torchvision)."""
    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    libraries = [p for folder in folders for p in Path(folder).glob("_C*.so")]
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except OSError:
        return False
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs ``ensure_torchvision_importable`` right before the first ``import torchvision``, then retires."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None  # the normal finders import torchvision itself


def install_torchvision_import_hook() -> None:
    """Apply the workaround lazily in every interpreter of the CPU tier environment.

    vLLM inspects model classes in a fresh ``python`` subprocess (and spawns engine processes with
    multiprocessing on), which never runs the caller's code: scripts/setup_vllm_cpu.sh puts a ``.pth`` file
    calling this into .venv-vllm. Costs nothing until torchvision is imported (no torch import at startup).
    """
    if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


# --- CPU tier / transformers >= 5 checkpoints: CLIP tower key names ----------------------------------------

_TOWER = "vision_tower."
_TOWER_MODEL = "vision_tower.vision_model."
_RENAMED_MARKER = "hscr_vllm_source.json"


def _tower_key(key: str) -> str:
    """``vision_tower.embeddings.x`` -> ``vision_tower.vision_model.embeddings.x`` (other keys unchanged)."""
    for prefix in ("model.", ""):
        tower = prefix + _TOWER
        if key.startswith(tower) and not key.startswith(prefix + _TOWER_MODEL):
            return prefix + _TOWER_MODEL + key[len(tower) :]
    return key


def needs_tower_rename(folder: str | Path) -> bool:
    """Whether any safetensors file of ``folder`` names the CLIP tower without ``vision_model.``."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            if any(_tower_key(k) != k for k in fh.keys()):  # noqa: SIM118 (safe_open has no __iter__)
                return True
    return False


def vllm_model_folder(folder: str | Path, *, out_dir: str | Path | None = None) -> Path:
    """``folder`` itself, or (when its CLIP tower keys need it) a copy with renamed keys, made once.

    The copy lives in ``out_dir`` (default: ``<folder>.vllm`` beside it) and is rebuilt when a source file's
    name, size or modification time changes. Only the weights are rewritten; other files are copied as they
    are. Actors starting together wait for one another (a lock file) instead of converting in parallel.
    """
    source = Path(folder)
    if not needs_tower_rename(source):
        return source
    target = Path(out_dir) if out_dir is not None else source.with_name(source.name + ".vllm")
    stamp = _source_stamp(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / _RENAMED_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        _write_renamed_copy(source, staging)
        (staging / _RENAMED_MARKER).write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _source_stamp(source: Path) -> dict[str, Any]:
    """What identifies the source folder's content cheaply (no hashing of many GB of weights)."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    return {
        "source": str(source.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def _write_renamed_copy(source: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    for path in source.iterdir():
        if path.suffix == ".safetensors":
            tensors = {_tower_key(k): v for k, v in load_file(str(path)).items()}
            save_file(tensors, str(target / path.name), metadata={"format": "pt"})
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    index = target / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoints name every key once more in their index
        data = json.loads(index.read_text())
        data["weight_map"] = {_tower_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
