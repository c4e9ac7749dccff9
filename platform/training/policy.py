"""The policy and the reference of DPO training: the policy loaded (LoRA-wrapped if asked) with its trainable
parameters chosen, and the frozen reference whose log-probs are read from the shards when their fingerprint
matches and computed otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from hscr_platform.models.logprobs import shared_prefix_logps
from hscr_platform.training.pref_data import (
    PrefBatch,
)

# --- model, engine, reference -------------------------------------------------------------------------


def load_policy(cfg: Any) -> tuple[Any, Any]:
    """The policy (LoRA-wrapped if asked) in training mode, with the trainable parameters chosen."""
    from hscr_platform.models.loading import ModelConfig, load_vlm

    model, processor = load_vlm(ModelConfig(path=cfg.policy.path, dtype=dtype_name(cfg)))
    if cfg.policy.lora.enabled:
        model = with_lora(model, cfg.policy.lora)
    elif cfg.policy.freeze_vision:
        from hscr_platform.training.sft_loop import vision_tower

        vision_tower(model).requires_grad_(False)
    model.train()
    return model, processor


def with_lora(model: Any, lora: Any) -> Any:
    """The model wrapped with fresh LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules))  # fmt: skip


def dtype_name(cfg: Any) -> str:
    return "bfloat16" if cfg.precision == "bf16" else "float32"


class Reference:
    """The frozen reference: the policy with its adapters off (LoRA, reference = policy start), or a separate
    copy loaded on first use. Its forward runs on every worker whenever any worker needs it, since a ZeRO-3
    forward gathers parameters collectively."""

    def __init__(self, cfg: Any, engine: Any, device: torch.device):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.use_adapters_off = cfg.policy.lora.enabled and cfg.reference.path is None
        self.model: Any = None

    def _separate(self) -> Any:
        if self.model is None:
            from hscr_platform.models.loading import ModelConfig, load_vlm

            path = self.cfg.reference.path or self.cfg.policy.path
            self.model = load_vlm(ModelConfig(path=path, dtype=dtype_name(self.cfg)))[0].to(self.device)
            self.model.requires_grad_(False)
        return self.model

    @torch.no_grad()
    def logps(self, batch: PrefBatch, prefix: dict, pad_id: int) -> torch.Tensor:
        """(R,) reference log-probs of every response in the batch."""
        if not self.use_adapters_off:
            return self._forward(self._separate(), batch, prefix, pad_id)
        self.engine.module.eval()
        try:
            with self.engine.module.disable_adapter():
                return self._forward(self.engine, batch, prefix, pad_id)
        finally:
            self.engine.module.train()

    @staticmethod
    def _forward(model: Any, batch: PrefBatch, prefix: dict, pad_id: int) -> torch.Tensor:
        return shared_prefix_logps(model, prefix, batch.responses, batch.owner, pad_id=pad_id)[0]  # (R,)
