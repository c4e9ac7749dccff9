"""Loading any Hugging Face image-text model, and turning (image, question, answer) rows into model inputs.

One path for every model: the toy Med-VLM the project builds, LLaVA-Med v1.5 in HF format (after
``python -m jobs.convert``), Qwen2-VL / Qwen2.5-VL. Only local folders with safetensors weights, a processor and
a supported architecture are accepted (:func:`check_vlm_folder`, run by every job before Ray starts); nothing is
downloaded; remote code is off unless asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from hscr_platform.data.images import open_rgb

IGNORE_INDEX = -100  # label value that the cross-entropy skips (prompt, image and padding positions)

# architectures whose every part the platform runs (tests/unit/test_logprobs.py, test_qwen2vl.py)
SUPPORTED_ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # processor may need torchvision: see load_processor
ORIGINAL_LLAVA = ("LlavaMistralForCausalLM", "LlavaLlamaForCausalLM")  # the original LLaVA repo's layout
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, SentencePiece, BPE


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to load and how."""

    path: str  # a local Hugging Face folder (config.json + *.safetensors + processor files)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


def check_vlm_folder(path: str | Path) -> Path:
    """Fail early, naming the problem, unless ``path`` is a local folder of a supported image-text model with
    safetensors weights and a processor (image processor + tokenizer)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_file.read_text())
    architecture = (config.get("architectures") or [None])[0]
    if architecture in ORIGINAL_LLAVA:
        raise ValueError(
            f"{folder} is an original-layout LLaVA checkpoint ({architecture}), which neither transformers nor "
            "vLLM loads: convert it first (python -m jobs.convert --config jobs/configs/convert/base.yaml "
            f"source.path={folder} output.path=<new folder>)"
        )
    if "vision_config" not in config:
        raise ValueError(f"{folder} is not a vision-language model (config.json has no vision_config)")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{folder}: architecture {architecture!r} (config.json) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_weights(folder)
    _check_processor(folder)
    return folder


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded: "
            "only *.safetensors are loaded (re-save the model with safe_serialization=True, or convert an "
            "original-layout LLaVA with python -m jobs.convert, which reads pickles only with allow_pickle=true)"
        )
    raise ValueError(f"{folder} has no *.safetensors weights (only safetensors are loaded)")


def _check_processor(folder: Path) -> None:
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ValueError(
            f"{folder} has no processor ({' or '.join(PROCESSOR_FILES)}): save the processor with the model"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def load_processor(folder: str | Path, *, trust_remote_code: bool = False) -> Any:
    """transformers' processor; for the Qwen2-VL family without torchvision (CPU machines), the equivalent
    :class:`~hscr_platform.models.mrope_processor.MropeProcessor` built from image processor + tokenizer."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    if model_type in MROPE_MODEL_TYPES and not is_torchvision_available():
        from hscr_platform.models.mrope_processor import MropeProcessor

        return MropeProcessor.from_folder(folder)
    return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_vlm(cfg: ModelConfig) -> tuple[Any, Any]:
    """(model, processor) through the Auto classes, in eval mode, on CPU (callers move it)."""
    from transformers import AutoModelForImageTextToText

    folder = check_vlm_folder(cfg.path)
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=getattr(torch, cfg.dtype),
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
    )
    processor = load_processor(folder, trust_remote_code=cfg.trust_remote_code)
    model.eval()
    return model, processor


def open_image(data: bytes) -> Image.Image:
    """Decoded RGB image from encoded bytes (validation happened at ingest); a 16-bit / I / F scan is windowed
    to 8-bit by its min..max first (``hscr_platform.data.images``), not clipped white by PIL's convert."""
    return open_rgb(data)


def _user_turn(question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def prompt_text(processor: Any, question: str) -> str:
    """The chat-formatted prompt that ends where the assistant's answer begins."""
    return str(processor.apply_chat_template([_user_turn(question)], add_generation_prompt=True))


def conversation_text(processor: Any, question: str, answer: str) -> str:
    """Prompt + answer + end-of-turn, as the model's chat template writes a finished exchange."""
    turns = [_user_turn(question), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return str(processor.apply_chat_template(turns, add_generation_prompt=False))


def encode_for_training(
    processor: Any, images: Sequence[Image.Image], questions: Sequence[str], answers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Right-padded inputs with ``labels`` = token ids on the answer (and end-of-turn) only.

    The images go through the processor once. How many tokens the answer has is measured on the text alone:
    chat templates put the answer after the prompt, so the prompt's ids are a prefix of the conversation's ids
    and the answer is the rest (checked, not assumed), and the image tokens the processor expands all sit in
    the prompt. The labels are then the last that-many real tokens of each row (checked against the ids).
    """
    tok = processor.tokenizer
    tok.padding_side = "right"
    full = [conversation_text(processor, q, a) for q, a in zip(questions, answers, strict=True)]
    batch = processor(images=list(images), text=full, return_tensors="pt", padding=True)
    texts = tok(full, add_special_tokens=False)["input_ids"]
    prompts = tok([prompt_text(processor, q) for q in questions], add_special_tokens=False)["input_ids"]
    ids, ends = batch["input_ids"], batch["attention_mask"].sum(-1).tolist()
    labels = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
    for i, (text_ids, prompt_ids) in enumerate(zip(texts, prompts, strict=True)):
        answer = text_ids[len(prompt_ids) :]
        if text_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"chat template: the prompt of row {i} is not a prefix of its conversation")
        end = int(ends[i])
        if ids[i, end - len(answer) : end].tolist() != answer:
            raise ValueError(f"row {i}: the processor's ids do not end with the answer's ids")
        labels[i, end - len(answer) : end] = ids[i, end - len(answer) : end]
    batch["labels"] = labels
    return dict(batch)


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers for a batch (left-padded so that every row continues from its own last token)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts = [prompt_text(processor, q) for q in questions]
    batch = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )  # (B, T + new)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    tok.padding_side = "right"
    return [text.strip() for text in tok.batch_decode(new_tokens, skip_special_tokens=True)]
