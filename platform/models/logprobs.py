"""Log-probabilities of responses given (image, question), with the image+prompt prefix encoded once.

HSCR scores 1 + k responses per example. The naive way (what TRL-style trainers do) runs 1 + k full forwards,
each re-encoding the image and re-reading 64-600 image tokens. Here the prefix (vision tower, projector, prompt)
runs once per example with a KV cache; the cache is then indexed out to the example's responses, which attend
to it. Log-probs and gradients equal the per-response forward to float tolerance (tests/unit/test_logprobs.py).

Batch layout: B examples, R = sum of their response counts; ``owner`` (R,) maps each response row to its
example. Prompts are left-padded so every prefix ends at the same column and responses follow directly.

Position ids are explicit everywhere: (B, P) for 1-D RoPE (LLaVA), (3, B, P) for the Qwen2-VL family's
multimodal RoPE (temporal, height, width; computed at encode time by :func:`mrope_positions`). The batch axis
is always the second to last, so ``positions[..., index, :]`` selects rows of either kind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hscr_platform.models.loading import prompt_text


def encode_prefixes(processor: Any, images: Sequence[Image.Image], questions: Sequence[str]) -> dict:
    """Left-padded chat prompts (ending where the answer starts) + pixel values, as model inputs.

    Qwen2-VL-family inputs (``image_grid_thw`` present) also get their (3, B, P) ``position_ids``.
    """
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = dict(
        processor(
            images=list(images), text=[prompt_text(processor, q) for q in questions], return_tensors="pt", padding=True
        )
    )
    tok.padding_side = "right"
    if "image_grid_thw" in batch:
        batch["position_ids"] = mrope_positions(
            batch["input_ids"],
            batch["attention_mask"],
            batch["image_grid_thw"],
            image_token_id=int(processor.image_token_id),
            merge_size=int(processor.image_processor.merge_size),
        )
    return batch


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    image_token_id: int,
    merge_size: int,
) -> torch.Tensor:
    """Qwen2-VL multimodal RoPE position ids, (3, B, P) = (temporal, height, width) per token.

    A text token at position p gets (p, p, p). An image whose patch grid is (t, h, w) fills
    n = t·(h/m)·(w/m) placeholder tokens (m = merge_size); starting at p, its token (i, j, k) gets
    (p + i, p + j, p + k), and the next token starts at p + max(h/m, w/m). Padding (mask 0) gets 0.
    input_ids, attention_mask: (B, P); image_grid_thw: (images, 3), the images in row order.
    """
    out = torch.zeros((3, *input_ids.shape), dtype=torch.long, device=input_ids.device)  # (3, B, P)
    grids = iter(image_grid_thw.tolist())
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        ids = input_ids[b][real].tolist()
        parts, pos, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                parts.append(torch.full((3, 1), pos, dtype=torch.long))
                pos, i = pos + 1, i + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack(grid).reshape(3, -1) + pos)  # (3, t·h·w)
            pos, i = pos + max(h, w), i + t * h * w
        out[:, b, real] = torch.cat(parts, dim=1).to(out.device)
    return out


def prefix_positions(prefix: dict) -> torch.Tensor:
    """Position ids of a left-padded prefix: its ``position_ids`` (mRoPE) or (B, P) from the mask."""
    if "position_ids" in prefix:
        return prefix["position_ids"]
    return (prefix["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # (B, P) left padding -> real positions


def following_positions(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Positions of ``width`` text tokens after each prefix: (..., B, P) -> (..., B, width).

    A prefix ends with a text token, whose position is the same on every mRoPE axis.
    """
    return positions[..., -1:] + 1 + torch.arange(width, device=positions.device)


def image_rows(prefix: dict, index: torch.Tensor) -> dict:
    """The image inputs of prefix rows ``index`` (R,): pixel values (and ``image_grid_thw``) per row.

    LLaVA's pixel values are (B, C, H, W); the Qwen2-VL family's are (Σ patches, D) with each image's patch
    count in ``image_grid_thw`` (B, 3), so rows are cut out and concatenated again.
    """
    if "image_grid_thw" not in prefix:
        return {"pixel_values": prefix["pixel_values"][index]}
    grid = prefix["image_grid_thw"]  # (B, 3)
    per_image = torch.split(prefix["pixel_values"], grid.prod(-1).tolist())
    picked = index.tolist()
    return {
        "pixel_values": torch.cat([per_image[i] for i in picked]),  # (Σ patches of the rows, D)
        "image_grid_thw": grid[index],  # (R, 3)
    }


def pad_responses(responses: Sequence[Sequence[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (R, T) token ids and their (R, T) bool mask."""
    width = max(len(r) for r in responses)
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)  # (R, T)
    mask = torch.zeros((len(responses), width), dtype=torch.bool)  # (R, T)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def _gather_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of ``ids`` under ``logits`` (R, T, V), zero where ``mask`` is False."""
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (R, T)
    return token_logps * mask


# --- activation checkpointing of the response forward ------------------------------------------------


def _read_only_update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A cache layer's update that returns prefix + new states without storing them: the backward's recompute
    of a layer then sees the same (prefix) cache as the forward did."""
    return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


@contextlib.contextmanager
def _checkpointed_layers(model: Any) -> Iterator[None]:
    """Decoder layers run under ``torch.utils.checkpoint`` (non-reentrant) while the context is open; their
    activations are recomputed in backward. Only layers in training mode checkpoint (not the reference)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [(m.gradient_checkpointing, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers]
    run = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for m in layers:
        m.gradient_checkpointing, m._can_checkpoint_with_cache = True, True
        m._gradient_checkpointing_func = run  # type: ignore[assignment]  # nn.Module's attribute typing
    try:
        yield
    finally:
        for m, (flag, can) in zip(layers, saved, strict=True):
            m.gradient_checkpointing = flag
            if can is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = can


def response_logits(model: Any, cache: Any, *, checkpointing: bool, **inputs: Any) -> torch.Tensor:
    """The responses' forward after the shared prefix: (R, T, V) logits. ``checkpointing`` trades compute for
    memory: each decoder layer keeps only its input and recomputes the rest in backward (the prefix cache is
    made read-only so that the recompute reads exactly what the forward read)."""
    if not checkpointing:
        return model(past_key_values=cache, **inputs).logits
    for layer in cache.layers:
        layer.update = types.MethodType(_read_only_update, layer)
    with _checkpointed_layers(model):
        return model(past_key_values=cache, **inputs).logits


def shared_prefix_logps(
    model: Any,
    prefix: dict,
    responses: Sequence[Sequence[int]],
    owner: Sequence[int],
    *,
    pad_id: int,
    mm_encoder_outputs: dict | None = None,
    activation_checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π(y_r | image, prompt) for every response row r, the prefix computed once per example.

    Returns (logps (R,), token_logps (R, T), mask (R, T)). ``mm_encoder_outputs`` replaces the image features
    computed from ``pixel_values`` (used for the visual-dropout view). ``activation_checkpointing`` recomputes
    the response forward's decoder layers in backward (same gradients, less memory: :func:`response_logits`).
    """
    device = prefix["input_ids"].device
    index = torch.as_tensor(list(owner), dtype=torch.long, device=device)  # (R,)
    attn = prefix["attention_mask"]  # (B, P)
    positions = prefix_positions(prefix)  # (B, P) or (3, B, P)
    inputs = {k: v for k, v in prefix.items() if k != "position_ids"}
    if mm_encoder_outputs is not None:
        inputs.pop("pixel_values", None)
        inputs["mm_encoder_outputs"] = mm_encoder_outputs
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1][index]  # (R, V): predicts each response's first token
    cache = out.past_key_values
    cache.batch_select_indices(index)  # (B, ...) -> (R, ...): each response row gets its example's prefix
    ids, mask = pad_responses(responses, pad_id=pad_id)
    ids, mask = ids.to(device), mask.to(device)
    resp_pos = following_positions(positions[..., index, :], ids.shape[1])  # (R, T) or (3, R, T)
    full_mask = torch.cat([attn[index], mask.long()], dim=1)  # (R, P + T)
    rest = response_logits(model, cache, checkpointing=activation_checkpointing, input_ids=ids,
                           attention_mask=full_mask, position_ids=resp_pos)  # fmt: skip
    logits = torch.cat([first_logits.unsqueeze(1), rest[:, :-1]], dim=1)  # (R, T, V): logits for token t
    token_logps = _gather_logps(logits, ids, mask)  # (R, T)
    return token_logps.sum(-1), token_logps, mask


def separate_logps(
    model: Any,
    prefix: dict,
    responses: Sequence[Sequence[int]],
    owner: Sequence[int],
    *,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive reference: one full forward per response (image + prompt + response), batched.

    Same outputs as :func:`shared_prefix_logps`; used by tests (equality) and benchmarks (baseline).
    """
    device = prefix["input_ids"].device
    index = torch.as_tensor(list(owner), dtype=torch.long, device=device)  # (R,)
    ids, mask = pad_responses(responses, pad_id=pad_id)
    ids, mask = ids.to(device), mask.to(device)
    attn = torch.cat([prefix["attention_mask"][index], mask.long()], dim=1)  # (R, P + T)
    rows = prefix_positions(prefix)[..., index, :]  # (R, P) or (3, R, P)
    positions = torch.cat([rows, following_positions(rows, ids.shape[1])], dim=-1)  # (..., R, P + T)
    seq = torch.cat([prefix["input_ids"][index], ids], dim=1)  # (R, P + T)
    logits = model(
        input_ids=seq, attention_mask=attn, position_ids=positions, **image_rows(prefix, index)
    ).logits  # (R, P + T, V)
    width = prefix["input_ids"].shape[1]
    token_logps = _gather_logps(logits[:, width - 1 : -1], ids, mask)  # (R, T)
    return token_logps.sum(-1), token_logps, mask


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens at the LLM input, (B, N, D): what visual-token dropout acts on."""
    out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    feats = out.pooler_output
    if isinstance(feats, list | tuple):
        feats = torch.stack(list(feats))
    return feats  # (B, N, D)


def image_feature_list(model: Any, prefix: dict) -> list[torch.Tensor]:
    """Projected visual tokens at the LLM input, one (N_i, D) per image: N_i varies per image in the
    Qwen2-VL family (its resolution sets its grid), is the same for every image in LLaVA."""
    extra = {"image_grid_thw": prefix["image_grid_thw"]} if "image_grid_thw" in prefix else {}
    pixels = prefix["pixel_values"].to(device=model.device, dtype=model.dtype)
    out = model.model.get_image_features(pixel_values=pixels, return_dict=True, **extra)
    return list(out.pooler_output)  # (B, N, D) tensor or a tuple of (N_i, D): one (N_i, D) per image


def features_as_encoder_outputs(features: torch.Tensor | Sequence[torch.Tensor]) -> dict:
    """Wrap visual tokens ((B, N, D), or one (N_i, D) per image) so the model's forward uses them instead of
    the pixels."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    per_image = tuple(features)  # one (N_i, D) per image: what LLaVA's and Qwen2-VL's forwards concatenate
    return {"image": BaseModelOutputWithPooling(pooler_output=per_image)}  # type: ignore[arg-type]


def model_fingerprint(folder: str | Path, *, dtype: str = "float32", attn_implementation: str = "default") -> str:
    """sha256 over every weight, config, tokenizer, processor and chat-template file of a model folder, and the
    dtype and attention implementation the forwards run with.

    Reference log-probs stored with this fingerprint are valid exactly for this model + processor + template run
    at this precision with this attention kernel: fp32 log-probs are not reused for a bf16 policy.
    dtype: ``ModelConfig.dtype`` ("float32", "bfloat16", "float16"); attn_implementation: what the model was
    loaded with ("default" = whatever transformers picks when none is asked for, as ``load_vlm`` does).
    """
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    digest.update(f"\0dtype={dtype}\0attn_implementation={attn_implementation}".encode())
    return digest.hexdigest()[:16]


def drop_features(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the dropped visual tokens: (B, N, D) with keep (B, N) bool (positions and counts unchanged)."""
    return features * keep.unsqueeze(-1).to(features.dtype)
