"""Log-probabilities of responses given (image, question), with the image+prompt prefix encoded once.

HSCR scores 1 + k responses per example. The naive way (what TRL-style trainers do) runs 1 + k full forwards,
each re-encoding the image and re-reading 64-600 image tokens. Here the prefix (vision tower, projector, prompt)
runs once per example with a KV cache; the cache is then indexed out to the example's responses, which attend
to it. Log-probs and gradients equal the per-response forward to float tolerance (tests/unit/test_logprobs.py).

Batch layout: B examples, R = sum of their response counts; ``owner`` (R,) maps each response row to its
example. Prompts are left-padded so every prefix ends at the same column and responses follow directly.
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
    """Left-padded chat prompts (ending where the answer starts) + pixel values, as model inputs."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    batch = processor(
        images=list(images), text=[prompt_text(processor, q) for q in questions], return_tensors="pt", padding=True
    )
    tok.padding_side = "right"
    return dict(batch)


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
        m.gradient_checkpointing, m._gradient_checkpointing_func, m._can_checkpoint_with_cache = True, run, True
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
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) left padding -> real positions
    inputs = dict(prefix)
    if mm_encoder_outputs is not None:
        inputs.pop("pixel_values", None)
        inputs["mm_encoder_outputs"] = mm_encoder_outputs
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1][index]  # (R, V): predicts each response's first token
    cache = out.past_key_values
    cache.batch_select_indices(index)  # (B, ...) -> (R, ...): each response row gets its example's prefix
    ids, mask = pad_responses(responses, pad_id=pad_id)
    ids, mask = ids.to(device), mask.to(device)
    resp_pos = positions[:, -1:][index] + 1 + torch.arange(ids.shape[1], device=device)  # (R, T)
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
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # (R, P + T)
    seq = torch.cat([prefix["input_ids"][index], ids], dim=1)  # (R, P + T)
    logits = model(
        input_ids=seq, pixel_values=prefix["pixel_values"][index], attention_mask=attn, position_ids=positions
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


def features_as_encoder_outputs(features: torch.Tensor) -> dict:
    """Wrap (B, N, D) visual tokens so that the model's forward uses them instead of the pixels."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    per_image = tuple(features)  # one (N, D) per image: what LLaVA's forward concatenates
    return {"image": BaseModelOutputWithPooling(pooler_output=per_image)}  # type: ignore[arg-type]


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over every weight, config, tokenizer, processor and chat-template file of a model folder.

    Reference log-probs stored with this fingerprint are valid exactly for this model + processor + template.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def drop_features(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the dropped visual tokens: (B, N, D) with keep (B, N) bool (positions and counts unchanged)."""
    return features * keep.unsqueeze(-1).to(features.dtype)
