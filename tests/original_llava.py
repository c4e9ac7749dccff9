"""A tiny checkpoint in the ORIGINAL LLaVA layout (what LLaVA-Med v1.5 ships), and its reference forward.

Written from the original repository's conventions: config.json = the language model's config + ``mm_*`` keys,
one state dict with ``model.*`` (the LM), ``lm_head.weight``, ``model.mm_projector.{0,2}.*`` (Linear, GELU,
Linear) and, optionally, ``model.vision_tower.vision_tower.vision_model.*`` (the CLIP tower); a tokenizer with
no image token (the original code splices the image features in where the prompt says ``<image>``).
The reference forward is that splice, computed from the pieces kept in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXTS = [
    "is there a nodule?", "is there a mass?", "what modality is this?", "describe the image.", "yes", "no",
    "ct", "mri", "x-ray", "left", "right", "upper", "lower", "ct of the chest showing a nodule on the left.",
    "mri of the brain with no abnormality.", "[INST] [/INST]", "USER: ASSISTANT:",
]  # fmt: skip


@dataclass
class Original:
    folder: Path
    tower_dir: Path
    lm: Any  # MistralForCausalLM / LlamaForCausalLM
    tower: Any  # CLIPVisionModel
    projector: torch.nn.Sequential
    select_layer: int


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=alphabet))  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # like Llama
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_original_llava(
    root: Path, *, family: str = "mistral", tower_in_checkpoint: bool = True, pickle: bool = False
) -> Original:
    """``root/original`` (the checkpoint) and ``root/clip`` (its CLIP tower folder); LM heads are 32 wide."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    folder, tower_dir = root / "original", root / "clip"
    folder.mkdir(parents=True)
    tok = _tokenizer()
    tok.save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
    tower = CLIPVisionModel(vision).eval()
    tower.save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)
    text_cls, lm_cls = (MistralConfig, MistralForCausalLM) if family == "mistral" else (LlamaConfig, LlamaForCausalLM)
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    lm = lm_cls(text).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    weights = dict(lm.state_dict())  # model.embed_tokens.weight, model.layers.*, model.norm.weight, lm_head.weight
    weights |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}  # 0.weight, 2.bias, ...
    if tower_in_checkpoint:
        weights |= {f"model.vision_tower.vision_tower.{k}": v for k, v in _clip_names(tower).items()}
    config = {
        **text.to_dict(),
        "architectures": ["LlavaMistralForCausalLM" if family == "mistral" else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if family == "mistral" else "llava_llama",
        "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": 256,
        "use_mm_proj": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.contiguous().clone() for k, v in weights.items()}
    if pickle:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(weights, folder / "model.safetensors")
    return Original(folder, tower_dir, lm, tower, projector, -2)


def _clip_names(tower: Any) -> dict[str, torch.Tensor]:
    """The tower's tensors under CLIP's ``vision_model.*`` names (what the original checkpoints hold)."""
    state = tower.state_dict()
    return {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in state.items()}


@torch.no_grad()
def original_logits(original: Original, ids: list[int], image_at: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """The original LLaVA forward: (L, V) logits for ``ids`` whose position ``image_at`` is the image.

    Image features = CLIP hidden states of layer ``mm_vision_select_layer`` without CLS ("patch"), through
    the projector; they replace the one image position, so the sequence grows by N - 1.
    """
    hidden = original.tower(pixel_values, output_hidden_states=True).hidden_states[original.select_layer]
    features = original.projector(hidden[:, 1:])[0]  # (N, D)
    embed = original.lm.get_input_embeddings()
    tokens = torch.tensor(ids)
    embeds = torch.cat([embed(tokens[:image_at]), features, embed(tokens[image_at + 1 :])])  # (L, D)
    return original.lm(inputs_embeds=embeds[None]).logits[0]  # (L, V)
