"""The ``transformers`` decoding engine: forced tokens, then greedy decoding, the image prefix encoded once.

All levels of one example continue the same image + prompt. The engine runs the prefix (vision tower,
projector, prompt) once per example with a KV cache, indexes that cache out to the example's requests
(``batch_select_indices``), prefills each request's forced tokens in one parallel pass and decodes greedily,
dropping finished rows from the batch. ``reuse_prefix=False`` is the naive baseline the benchmark compares
against: the same code with one prefix per request (the image and prompt recomputed for every level).

Batch layout. Prompts are left-padded, so every prefix ends at the same column. The cache holds the prompt
minus its last token; each request's *segment* is ``[last prompt token, *forced]``, also left-padded, so all
segments end at the same column and a segment is never empty (a request with no forced tokens still gets its
first logits from the segment). Padding in the middle of a row is masked out and position ids skip it.
Position ids are (R, L) for 1-D RoPE or (3, R, L) for mRoPE (Qwen2-VL family); the batch axis is second to last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hscr_platform.models.engines.decoding import Continuation, ContinuationRequest
from hscr_platform.models.logprobs import encode_prefixes, image_rows, prefix_positions


@dataclass
class DecodeStats:
    """What the engine computed so far (the benchmark reads it)."""

    forward_tokens: int = 0  # token positions fed to the language model, padding included
    prefixes: int = 0  # image + prompt prefixes encoded (images through the vision tower)
    forwards: int = 0


@dataclass
class _Batch:
    """The decoding state of the still-active rows (row i of every tensor = request ``rows[i]``)."""

    rows: list[int]  # request indices
    cache: Any  # DynamicCache, batch = len(rows)
    mask: torch.Tensor  # (A, L) attention mask over cache + fed tokens
    next_pos: torch.Tensor  # (A,) or (3, A): position id of the next token
    logits: torch.Tensor  # (A, V) logits of the next token


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (int or list), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def group_requests(requests: Sequence[ContinuationRequest], *, reuse_prefix: bool) -> tuple[list[int], list[int]]:
    """(first request index of each prefix group, owner group of each request).

    With reuse, requests with the same ``example_id`` share one group (in order of first appearance);
    without, every request is its own group.
    """
    if not reuse_prefix:
        return list(range(len(requests))), list(range(len(requests)))
    group_of: dict[str, int] = {}
    heads: list[int] = []
    owner: list[int] = []
    for i, request in enumerate(requests):
        if request.example_id not in group_of:
            group_of[request.example_id] = len(heads)
            heads.append(i)
        owner.append(group_of[request.example_id])
    return heads, owner


def _forced_logprobs(logits: torch.Tensor, seg_ids: torch.Tensor, lengths: Sequence[int]) -> list[tuple[float, ...]]:
    """Log-probs of each row's last ``lengths[r]`` segment tokens: logits (R, S, V), seg_ids (R, S).

    Segments are left-padded and end at column S - 1, so row r's forced tokens sit in columns
    ``S - n .. S - 1`` and are predicted by the logits in columns ``S - n - 1 .. S - 2``.
    """
    width = seg_ids.shape[1]
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (R, S - 1, V)
    emitted = logps.gather(-1, seg_ids[:, 1:, None]).squeeze(-1)  # (R, S - 1)
    return [tuple(emitted[r, width - 1 - n :].tolist()) if n else () for r, n in enumerate(lengths)]


class HFDecoder:
    """Greedy continuations with ``transformers`` (implements ``hscr_platform.models.engines.decoding.Decoder``)."""

    def __init__(self, model: Any, processor: Any, *, reuse_prefix: bool = True):
        self.model = model
        self.processor = processor
        self.reuse_prefix = reuse_prefix
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.eos_ids = eos_ids_of(model, processor.tokenizer)
        self.stats = DecodeStats()

    def continue_greedy(self, requests: Sequence[ContinuationRequest]) -> list[Continuation]:
        return [continuation for continuation, _ in self.continue_greedy_scored(requests)]

    @torch.no_grad()
    def continue_greedy_scored(
        self, requests: Sequence[ContinuationRequest]
    ) -> list[tuple[Continuation, tuple[float, ...]]]:
        """``continue_greedy`` plus the log-prob of every forced token, so that a response's log-probs under
        this model (forced + continuation) need no second forward."""
        if not requests:
            return []
        tokens: list[list[int]] = [[] for _ in requests]
        logps: list[list[float]] = [[] for _ in requests]
        budgets = [0 if r.forced and r.forced[-1] in self.eos_ids else r.max_new_tokens for r in requests]
        batch, forced = self._prefill(requests)
        batch = self._keep(batch, [budget == 0 for budget in budgets])
        while batch.rows:
            self._emit(batch, tokens, logps)
            batch = self._keep(
                batch, [len(tokens[r]) >= budgets[r] or tokens[r][-1] in self.eos_ids for r in batch.rows]
            )
            if batch.rows:
                batch = self._step(batch, tokens)
        return [
            (Continuation(token_ids=(*r.forced, *t), logprobs=tuple(lp)), f)
            for r, t, lp, f in zip(requests, tokens, logps, forced, strict=True)
        ]

    def close(self) -> None:
        self.model = None

    # --- internals ---------------------------------------------------------------------------------

    def _forward(self, *, keep: int = 1, **inputs: Any) -> Any:
        self.stats.forwards += 1
        self.stats.forward_tokens += int(inputs["input_ids"].numel())
        return self.model(**inputs, use_cache=True, logits_to_keep=keep)  # keep = 0: every position

    def _prefill(self, requests: Sequence[ContinuationRequest]) -> tuple[_Batch, list[tuple[float, ...]]]:
        """Prefix once per group, cache indexed out to the requests, then every segment in one pass.

        Also returns each request's forced-token log-probs (from the same pass: its logits at every segment
        position predict the next forced token).
        """
        heads, owner = group_requests(requests, reuse_prefix=self.reuse_prefix)
        device = self.model.device
        prefix = encode_prefixes(
            self.processor, [requests[h].image for h in heads], [requests[h].question for h in heads]
        )
        ids = prefix["input_ids"].to(device)  # (E, P)
        attn = prefix["attention_mask"].to(device)  # (E, P)
        positions = prefix_positions(prefix).to(device)  # (E, P) or (3, E, P)
        images = image_rows(prefix, torch.arange(len(heads)))  # every prefix row
        images = {k: v.to(device) for k, v in images.items()}
        images["pixel_values"] = images["pixel_values"].to(self.model.dtype)
        out = self._forward(
            input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=positions[..., :-1], **images
        )
        self.stats.prefixes += len(heads)
        index = torch.as_tensor(owner, dtype=torch.long, device=device)  # (R,)
        cache = out.past_key_values
        if len(heads) != len(requests):
            cache.batch_select_indices(index)  # (E, ...) -> (R, ...)
        segments = [[int(ids[o, -1]), *r.forced] for o, r in zip(owner, requests, strict=True)]
        seg_ids, seg_mask, seg_pos = self._segments(segments, positions[..., index, -1])
        mask = torch.cat([attn[index, :-1], seg_mask], dim=1)  # (R, P - 1 + S)
        out = self._forward(
            input_ids=seg_ids, attention_mask=mask, position_ids=seg_pos, past_key_values=cache, keep=0
        )  # logits (R, S, V)
        forced = _forced_logprobs(out.logits, seg_ids, [len(r.forced) for r in requests])
        next_pos = seg_pos[..., -1] + 1  # (R,) or (3, R)
        batch = _Batch(list(range(len(requests))), out.past_key_values, mask, next_pos, out.logits[:, -1])
        return batch, forced

    def _segments(
        self, segments: Sequence[Sequence[int]], start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded (R, S) segment ids, mask and position ids (``start[..., r]``: position of token 0;
        positions come out (R, S), or (3, R, S) for a (3, R) start)."""
        width = max(len(s) for s in segments)
        device = start.device
        ids = torch.full((len(segments), width), self.pad_id, dtype=torch.long, device=device)  # (R, S)
        mask = torch.zeros((len(segments), width), dtype=torch.long, device=device)  # (R, S)
        for i, seg in enumerate(segments):
            ids[i, width - len(seg) :] = torch.as_tensor(list(seg), dtype=torch.long, device=device)
            mask[i, width - len(seg) :] = 1
        offsets = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, S): 0 on the padding, then 0..len-1
        return ids, mask, start.unsqueeze(-1) + offsets  # (R, S) each; positions (..., R, S)

    def _emit(self, batch: _Batch, tokens: list[list[int]], logps: list[list[float]]) -> None:
        """Append each active row's greedy token and its log-prob."""
        chosen = batch.logits.argmax(-1)  # (A,)
        token_logps = torch.log_softmax(batch.logits.float(), dim=-1).gather(-1, chosen[:, None])  # (A, 1)
        for i, row in enumerate(batch.rows):
            tokens[row].append(int(chosen[i]))
            logps[row].append(float(token_logps[i, 0]))

    def _keep(self, batch: _Batch, finished: Sequence[bool]) -> _Batch:
        """The batch without its finished rows (their cache rows are dropped: no more work for them)."""
        keep = [i for i, done in enumerate(finished) if not done]
        if len(keep) == len(finished):
            return batch
        if not keep:
            return _Batch([], None, batch.mask, batch.next_pos, batch.logits)
        index = torch.as_tensor(keep, dtype=torch.long, device=batch.mask.device)  # (A',)
        batch.cache.batch_select_indices(index)
        rows = [batch.rows[i] for i in keep]
        return _Batch(rows, batch.cache, batch.mask[index], batch.next_pos[..., index], batch.logits[index])

    def _step(self, batch: _Batch, tokens: list[list[int]]) -> _Batch:
        """Feed every active row its last token: the next logits."""
        fed = torch.as_tensor([tokens[r][-1] for r in batch.rows], dtype=torch.long, device=batch.mask.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)  # (A, L + 1)
        out = self._forward(
            input_ids=fed[:, None],
            attention_mask=mask,
            position_ids=batch.next_pos[..., None],
            past_key_values=batch.cache,
        )
        return _Batch(batch.rows, out.past_key_values, mask, batch.next_pos + 1, out.logits[:, -1])
