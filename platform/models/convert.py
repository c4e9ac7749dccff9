"""Original-layout LLaVA / LLaVA-Med checkpoints -> a llava-hf ``LlavaForConditionalGeneration`` folder.

LLaVA-Med v1.5 (``LlavaMistralForCausalLM``) and LLaVA-1.5 (``LlavaLlamaForCausalLM``) ship in the layout of the
original LLaVA repository, which neither transformers nor vLLM loads:

    config.json       the language model's keys + mm_vision_tower, mm_hidden_size, mm_projector_type
                      ("mlp2x_gelu"), mm_vision_select_layer, mm_vision_select_feature ("patch" = drop CLS), ...
    weights           model.embed_tokens / model.layers.* / model.norm / lm_head      (the Mistral or Llama LM)
                      model.mm_projector.0.* and .2.*                                  (Linear, GELU, Linear)
                      model.vision_tower.vision_tower.vision_model.*  (the CLIP tower; often absent: the original
                      code loads it by name from ``mm_vision_tower``, so a local CLIP folder is given instead)
    tokenizer         no image token: the original code splices image features in at a sentinel id (-200)

The conversion maps every tensor to its llava-hf module (LM -> ``model.language_model``, projector ->
``model.multi_modal_projector.linear_1/2``, tower -> ``model.vision_tower``), adds ``<image>`` (and ``<pad>``
when missing) to the tokenizer, grows the embedding and LM-head matrices by one mean row per added token (the
original vocabulary's logits are unchanged), and writes safetensors, a LlavaProcessor and the chat template.
Pickle weights (.bin/.pt) are read only when asked (``allow_pickle``): unpickling can run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

ORIGINAL_ARCHITECTURES = {"LlavaMistralForCausalLM": "mistral", "LlavaLlamaForCausalLM": "llama"}
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
SELECT_FEATURE: dict[str, Literal["default", "full"]] = {"patch": "default", "cls_patch": "full"}  # -> llava-hf
MM_KEYS_PREFIX = ("mm_", "freeze_mm", "tune_mm", "image_", "tokenizer_", "use_mm")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# The conversation formats of the original repo ("conv_mode"), as chat templates over the platform's messages.
_IMAGE_OR_TEXT = (
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {
    # LLaVA-Med v1.5 (conv_mode mistral_instruct): "[INST] <image>\nQ [/INST] A</s>"
    "mistral_instruct": (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] " + _IMAGE_OR_TEXT + " [/INST]"
        "{% else %} {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    ),
    # LLaVA-1.5 (conv_mode vicuna_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>"
    "vicuna_v1": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
        "{% for m in messages %}{% if m['role'] == 'user' %} USER: " + _IMAGE_OR_TEXT + ""
        "{% else %} ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
}
DEFAULT_TEMPLATE = {"mistral": "mistral_instruct", "llama": "vicuna_v1"}


@dataclass(frozen=True, kw_only=True)
class ConvertSource:
    path: str  # the original-layout folder (config.json, weights, tokenizer)
    vision_tower: str | None = None  # local CLIP folder; null = the checkpoint's mm_vision_tower (a local path)
    allow_pickle: bool = False  # read .bin/.pt weights (unpickling can run code: only for trusted files)


@dataclass(frozen=True, kw_only=True)
class ConvertOutput:
    path: str  # the llava-hf folder to write
    overwrite: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = the checkpoint's own dtype
    max_shard_size: str = "5GB"


@dataclass(frozen=True, kw_only=True)
class ConvertJobConfig:
    source: ConvertSource
    output: ConvertOutput
    chat_template: Literal["auto", "mistral_instruct", "vicuna_v1"] = "auto"  # auto: by the language model


@dataclass(frozen=True)
class OriginalLlava:
    """What a checked original-layout folder holds (the weights are read later)."""

    folder: Path
    config: dict[str, Any]
    family: str  # "mistral" or "llama"
    tower: Path  # local CLIP folder: the tower's config, image preprocessing and (if not in the checkpoint) weights


def check_original(path: str | Path, *, vision_tower: str | None = None) -> OriginalLlava:
    """The original-layout checkpoint at ``path``, or a ValueError naming what is wrong and where."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"source.path: {folder} has no config.json")
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    if arch not in ORIGINAL_ARCHITECTURES:
        hint = " (already llava-hf: load it directly)" if arch == "LlavaForConditionalGeneration" else ""
        raise ValueError(
            f"source.path: {folder} is {arch!r}, not an original-layout LLaVA "
            f"({', '.join(ORIGINAL_ARCHITECTURES)}){hint}"
        )
    checks = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_vision_select_feature": tuple(SELECT_FEATURE),
        "mm_patch_merge_type": ("flat",),
        "mm_use_im_start_end": (False,),
    }
    for key, allowed in checks.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"source.path: {folder}/config.json {key}={value!r} is not supported (only {allowed})")
    tower_path = vision_tower or config.get("mm_vision_tower")
    tower = Path(tower_path) if tower_path and Path(tower_path).is_dir() else None
    if vision_tower and tower is None:
        raise FileNotFoundError(f"source.vision_tower: {vision_tower} is not a folder")
    if tower is None:
        raise ValueError(
            f"source.path: the CLIP tower {tower_path!r} (mm_vision_tower) is not a local folder: download it "
            "(config.json, preprocessor_config.json, weights) and set source.vision_tower=<folder>"
        )
    return OriginalLlava(folder, config, ORIGINAL_ARCHITECTURES[arch], tower)


def read_weights(folder: Path, *, allow_pickle: bool, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a folder: its *.safetensors, else (only if allowed) its pickle files."""
    from safetensors.torch import load_file

    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return {k: v for shard in shards for k, v in load_file(shard).items()}
    pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not pickles:
        raise ValueError(f"{what}: {folder} has no weights (*.safetensors, *.bin, *.pt)")
    if not allow_pickle:
        raise ValueError(
            f"{what}: {folder} has only pickle weights ({', '.join(p.name for p in pickles[:3])}); unpickling can "
            "run code: set source.allow_pickle=true only if you trust this checkpoint"
        )
    out: dict[str, torch.Tensor] = {}
    for p in pickles:
        out.update(torch.load(p, map_location="cpu", weights_only=True))  # tensors only, no arbitrary objects
    return out


def split_weights(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Original tensor names -> {"language_model", "lm_head", "projector", "tower"} with module-relative names.

    The vision-tower keys keep the CLIP ``vision_model.*`` names minus ``vision_model.``; unknown keys fail.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"language_model": {}, "lm_head": {}, "projector": {}, "tower": {}}
    for name, tensor in weights.items():
        projector = next((new for old, new in PROJECTOR.items() if name.startswith(old)), None)
        if projector is not None:
            parts["projector"][projector + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith(TOWER_PREFIX):
            parts["tower"][name.removeprefix(TOWER_PREFIX)] = tensor
        elif name.startswith("lm_head."):
            parts["lm_head"][name.removeprefix("lm_head.")] = tensor
        elif name.startswith("model.") and not name.startswith(("model.mm_projector", "model.vision_tower")):
            parts["language_model"][name.removeprefix("model.")] = tensor
        else:
            raise ValueError(f"weight {name!r} has no place in LlavaForConditionalGeneration")
    return parts


def grow_rows(matrix: torch.Tensor, extra: int) -> torch.Tensor:
    """(V, D) -> (V + extra, D): new rows are the mean row, so old rows (and the logits they give) are kept."""
    if extra == 0:
        return matrix
    mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)  # (1, D)
    return torch.cat([matrix, mean.expand(extra, -1)])  # (V + extra, D)


def text_config_of(original: OriginalLlava, vocab_size: int) -> Any:
    """The language model's config from the original config.json minus the multimodal keys."""
    from transformers import LlamaConfig, MistralConfig

    keys = {k: v for k, v in original.config.items() if not k.startswith(MM_KEYS_PREFIX)}
    for k in ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        keys.pop(k, None)
    keys["vocab_size"] = vocab_size
    return (MistralConfig if original.family == "mistral" else LlamaConfig)(**keys)


def tower_config_of(tower: Path) -> Any:
    """CLIPVisionConfig from a CLIP folder (a full CLIPConfig's vision part, or a vision-only config)."""
    from transformers import CLIPVisionConfig

    raw = json.loads((tower / "config.json").read_text())
    return CLIPVisionConfig(**{k: v for k, v in raw.get("vision_config", raw).items() if k != "model_type"})


def converted_tokenizer(folder: Path) -> tuple[Any, int]:
    """The checkpoint's tokenizer with ``<image>`` (and ``<pad>`` if it has no pad token) added; (tokenizer,
    number of added tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]} if "<image>" not in tok.get_vocab() else {})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.image_token = "<image>"  # what LlavaProcessor expands (saved in tokenizer_config.json)
    return tok, len(tok) - before


def image_processor_of(tower: Path, image_size: int) -> Any:
    """The tower folder's CLIP preprocessing (PIL backend: no torchvision), else CLIP defaults at its size."""
    from transformers import CLIPImageProcessorPil

    if (tower / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(tower)
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_llava(original: OriginalLlava, parts: dict[str, dict[str, torch.Tensor]], tok: Any, added: int) -> Any:
    """LlavaForConditionalGeneration holding the original tensors (embedding / LM head grown by ``added``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    lm = parts["language_model"]
    lm["embed_tokens.weight"] = grow_rows(lm["embed_tokens.weight"], added)
    head: torch.Tensor | None = parts["lm_head"].get("weight")
    tied = head is None
    text = text_config_of(original, vocab_size=lm["embed_tokens.weight"].shape[0])
    text.tie_word_embeddings = tied
    text.pad_token_id = tok.pad_token_id
    config = LlavaConfig(
        vision_config=tower_config_of(original.tower),
        text_config=text,
        image_token_index=int(tok.convert_tokens_to_ids("<image>")),
        vision_feature_layer=int(original.config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=SELECT_FEATURE[original.config.get("mm_vision_select_feature", "patch")],
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    inner = model.model
    _load(inner.language_model, lm, "language model")
    _load(inner.multi_modal_projector, parts["projector"], "mm_projector")
    _load(inner.vision_tower, _tower_names(inner.vision_tower, parts["tower"]), "vision tower")
    if head is None:
        model.tie_weights()
    else:
        _load(model.lm_head, {"weight": grow_rows(head, added)}, "lm_head")
    return model


def _tower_names(tower: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ``vision_model.``-relative names -> the tower module's own names (with or without the prefix)."""
    wants_prefix = any(k.startswith("vision_model.") for k in tower.state_dict())
    return {("vision_model." + k if wants_prefix else k): v for k, v in weights.items()}


def _load(module: Any, weights: dict[str, torch.Tensor], what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    module.load_state_dict(weights, strict=True, assign=True)


def convert(cfg: ConvertJobConfig) -> Path:
    """Check, read, map and write: the llava-hf folder (safetensors, processor, chat template)."""
    from transformers import LlavaProcessor

    original = check_original(cfg.source.path, vision_tower=cfg.source.vision_tower)
    out = _check_output(cfg.output)  # created only once the weights are read and mapped
    parts = split_weights(read_weights(original.folder, allow_pickle=cfg.source.allow_pickle, what="source.path"))
    if not parts["tower"]:
        tower = read_weights(original.tower, allow_pickle=cfg.source.allow_pickle, what="source.vision_tower")
        parts["tower"] = {k.removeprefix("vision_model."): v for k, v in tower.items()}  # CLIP or CLIPVision
    tok, added = converted_tokenizer(original.folder)
    model = build_llava(original, parts, tok, added)
    dtype = next(iter(parts["language_model"].values())).dtype if cfg.output.dtype == "auto" else cfg.output.dtype
    model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=cfg.output.max_shard_size)
    vision = model.config.vision_config
    template = cfg.chat_template if cfg.chat_template != "auto" else DEFAULT_TEMPLATE[original.family]
    LlavaProcessor(
        image_processor=image_processor_of(original.tower, vision.image_size),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token, dropped by "default"
        chat_template=CHAT_TEMPLATES[template],
    ).save_pretrained(out)
    return out


def _check_output(cfg: ConvertOutput) -> Path:
    out = Path(cfg.path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ValueError(f"output.path: {out} is not empty (set output.overwrite=true to replace its files)")
    return out


def run(cfg: ConvertJobConfig) -> Path:
    """The job: convert, then load the result through the platform's own checks and print where it is."""
    from hscr_platform.models.loading import check_vlm_folder

    out = check_vlm_folder(convert(cfg))
    print(f"jobs.convert: wrote {out} (LlavaForConditionalGeneration, safetensors, processor, chat template)")
    return out
