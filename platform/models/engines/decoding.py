"""The one small interface every decoding engine implements (transformers on CPU, vLLM on GPU / CPU tier).

HSCR stage 2 builds dispreferred responses by forcing hallucinated tokens into the preferred response y_w and
letting the model continue. A level-m candidate is y_w up to its m-th most-coupled position with the m
replacements swapped in (``hscr.replace.edited_prefix``), then greedy decoding. Forcing a known token sequence
is prefilling it: engines take the edited prefix as forced response tokens and decode greedily after it, which
gives the same tokens as forcing them one step at a time through a logits processor, in one parallel pass.

All requests of one example share the image + prompt; engines encode that prefix once (KV-cache reuse in
transformers, prefix caching in vLLM) and continue each level from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ContinuationRequest:
    """Continue the answer to ``question`` about ``image`` after the forced response tokens."""

    example_id: str  # requests with the same id share image + question (and their prefix computation)
    image: Any  # PIL.Image.Image, RGB
    question: str
    forced: tuple[int, ...]  # response tokens emitted before free decoding starts (may be empty)
    max_new_tokens: int  # tokens decoded after ``forced`` at most (stops earlier at end-of-sequence)


@dataclass(frozen=True)
class Continuation:
    token_ids: tuple[int, ...]  # the whole response: forced tokens + greedy continuation (+ eos if emitted)
    logprobs: tuple[float, ...]  # log-prob of each continuation token (after ``forced``) under the model


class Decoder(Protocol):
    """A decoding engine: greedy continuations for a batch of requests, in request order."""

    def continue_greedy(self, requests: Sequence[ContinuationRequest]) -> list[Continuation]: ...

    def close(self) -> None: ...
