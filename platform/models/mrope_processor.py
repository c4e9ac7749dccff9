"""Model inputs for the Qwen2-VL family built from its image processor and tokenizer, without torchvision.

transformers' ``Qwen2VLProcessor`` needs a video processor, which needs torchvision; on a CPU-only machine
torchvision cannot be imported beside CPU torch (docs ENVIRONMENT.md). The model itself does not need it, so
:class:`MropeProcessor` does what the processor does for images: run the (PIL) image processor, expand each
``<|image_pad|>`` into one token per merged patch (``t·h·w / merge²``), tokenize, pad, and add
``mm_token_type_ids`` (1 on image tokens). It is used only where transformers' own processor cannot load
(:func:`hscr_platform.models.loading.load_processor`); its outputs equal the processor's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image


class MropeProcessor:
    """The processor interface the platform uses (``tokenizer``, ``image_processor``, ``apply_chat_template``,
    ``__call__``, ``save_pretrained``) for Qwen2-VL / Qwen2.5-VL folders."""

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = str(getattr(tokenizer, "image_token", None) or "<|image_pad|>")
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))

    @classmethod
    def from_folder(cls, folder: str | Path) -> MropeProcessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        template = getattr(tokenizer, "chat_template", None)
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        if not template:
            raise ValueError(f"{folder} has no chat template (chat_template.jinja or in tokenizer_config.json)")
        return cls(Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer, template)

    def apply_chat_template(self, conversation: list[dict], *, add_generation_prompt: bool = False) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        )

    def __call__(
        self,
        *,
        images: Sequence[Image.Image],
        text: Sequence[str],
        return_tensors: str | None = None,
        padding: bool = False,
    ) -> dict[str, Any]:
        """input_ids, attention_mask, mm_token_type_ids (one row per text), pixel_values (Σ patches, D) and
        image_grid_thw (images, 3); images fill the texts' image tokens in order."""
        pixels = self.image_processor(list(images), return_tensors="pt")
        counts = iter((pixels["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist())
        expanded = []
        for t in text:
            pieces = t.split(self.image_token)
            expanded.append(pieces[0] + "".join(self.image_token * next(counts) + p for p in pieces[1:]))
        batch = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors))
        ids = batch["input_ids"]
        if isinstance(ids, torch.Tensor):
            batch["mm_token_type_ids"] = (ids == self.image_token_id).int()  # (B, P)
        else:
            batch["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in row] for row in ids]
        return {**batch, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(self.chat_template)
