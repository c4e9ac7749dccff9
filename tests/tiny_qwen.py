"""A tiny random-init Qwen2-VL / Qwen2.5-VL folder built from configs (never downloaded): model, PIL image
processor, a BPE tokenizer with Qwen's special tokens, and a Qwen-style chat template."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "is there a nodule?", "describe the image.", "yes", "no", "ct of the chest showing a nodule on the left.",
    "mri of the brain with no abnormality.", "user", "assistant", "where is the mass?", "left", "right",
]  # fmt: skip
QUESTIONS = ["is there a nodule?", "describe the image."]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL), initial_alphabet=alphabet)
    tok.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )  # fmt: skip


def build_tiny_qwen(out: Path, family: str) -> Path:
    """A random-init Qwen2-VL (``family="qwen2_vl"``) or Qwen2.5-VL folder: model, image processor, tokenizer."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tok = _tokenizer()
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL}
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    )  # fmt: skip
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=2)
    tokens = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **tokens))
    else:
        vision = dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=56,
            fullatt_block_indexes=[1], **common,
        )  # fmt: skip
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=14 * 14 * 4, max_pixels=14 * 14 * 64).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out
