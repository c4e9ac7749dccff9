"""HSCR stage 2, the pure part: which positions each negative replaces and which tokens a decoder must emit.

Level ``m`` (m = 1..levels) replaces the ``m`` most-coupled positions of ``y_w`` *that have a replacement* with
their hallucinated replacements (``hscr.rewards.hallucinated_replacement``): a coupled position with no plausible
alternative is skipped and the next one takes its place (docs/DATA.md, "Levels"). (ours) The edited prefix is
``y_w`` up to the last replaced position with those ``m`` tokens swapped in; the decoder then continues freely
(greedy by default) from the prompt plus that prefix. Every replacement token was chosen from ``y_w``'s own
two-view logits, so between replaced positions the prefix keeps ``y_w``'s tokens: this is what keeps each later
position meaning what stage 1 scored. A decoder either prefills ``prompt + edited_prefix(...)`` (vLLM) or asks
``forced_token`` at every step (step-by-step generation). The decoding loop itself lives in the platform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def replacement_plan(coupled: Sequence[int], *, levels: int) -> list[tuple[int, ...]]:
    """Positions to force per level: level ``m`` forces the ``m`` most-coupled positions ``coupled[:m]``.

    coupled: positions in descending order of coupling (``coupled_positions`` output, as a list), already
    without positions that have no replacement. Returns ``min(levels, len(coupled))`` tuples, the tuple of
    level ``m`` at index ``m − 1``, each sorted by position (decoding order).
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    positions = [int(p) for p in coupled]
    return [tuple(sorted(positions[:m])) for m in range(1, min(levels, len(positions)) + 1)]


def edited_prefix(reference_ids: Sequence[int], *, replacements: Mapping[int, int]) -> list[int]:
    """``y_w[: p_last + 1]`` with ``y_w[p]`` replaced by ``replacements[p]``: the prefix a level decodes from.

    reference_ids: ``y_w`` token ids (response only); replacements: position → replacement token, non-empty,
    each position inside ``y_w`` and each token different from the original (else ``ValueError``).
    """
    if not replacements:
        raise ValueError("a level must replace at least one position")
    prefix = [int(t) for t in reference_ids[: max(replacements) + 1]]
    for position, token in replacements.items():
        if not 0 <= position < len(reference_ids):
            raise ValueError(f"position {position} outside the response (length {len(reference_ids)})")
        if prefix[position] == token:
            raise ValueError(f"replacement at position {position} equals the original token {token}")
        prefix[position] = token
    return prefix


def forced_token(step: int, *, prefix_len: int, forced: Mapping[int, int]) -> int | None:
    """The token a decoder must emit at sequence index ``step``, or ``None`` for free decoding.

    step: index of the token about to be emitted in the full sequence (prompt included), i.e. the current
    sequence length; prefix_len: prompt length, so the response position is ``t = step − prefix_len``.
    forced: response position → token, e.g. ``dict(enumerate(edited_prefix(...)))``.
    """
    if step < prefix_len:
        raise ValueError(f"step {step} is inside the prompt (prefix_len {prefix_len})")
    return forced.get(step - prefix_len)
