"""A look at the rewards: one self-contained HTML file for a sample of preference rows.

For each example: the question, y_w with every token coloured by its logit shift Δ_t (green = the image
supports it, red = the dropped view prefers it; hover for Δ_t and the reward P_diff), the modality-coupled
positions boxed with their rank, and below it each kept level with its replaced tokens highlighted (hover for
the original token) and its similarity to y_w and reference log-prob. No scripts, no external assets.

    write_reward_view("runs/gen/preferences", "runs/sft/<hash>/model", "runs/gen/view.html", examples=24)
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hscr_platform.core.io import iter_rows, shard_files

COLUMNS = [
    "id",
    "question",
    "responses",
    "response_token_ids",
    "num_levels",
    "similarity",
    "replaced_positions",
    "original_token_ids",
    "coupled_positions",
    "token_shift",
    "token_reward",
    "ref_logps",
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.ex { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin-bottom: 1.2em; }
.q { color: #555; margin-bottom: 0.4em; } .meta { color: #777; font-size: 0.85em; }
table.rows { border-collapse: collapse; } .rows td, .rows th { padding: 0.15em 0; vertical-align: top; }
.line { font-family: ui-monospace, monospace; line-height: 1.9; }
.tok { padding: 1px 0; border-radius: 3px; white-space: pre; }
.coupled { outline: 2px solid #1a56db; } .rank { font-size: 0.65em; color: #1a56db; vertical-align: super; }
.repl { background: #f6c343; font-weight: bold; }
.rows th.label { white-space: nowrap; text-align: left; font-weight: normal; color: #555; padding-right: 1em; }
"""


def _colour(shift: float, scale: float) -> str:
    """Green for a positive shift (image-supported), red for negative, transparent near zero."""
    strength = min(abs(shift) / scale, 1.0) * 0.6 if scale > 0 else 0.0
    rgb = "34,160,80" if shift >= 0 else "220,60,60"
    return f"rgba({rgb},{strength:.2f})"


def _token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text (byte-level tokens decode alone; special tokens shown as written)."""
    return [tokenizer.decode([int(t)]) for t in ids]


def _preferred_line(row: dict, texts: list[str]) -> str:
    shifts, rewards = row["token_shift"], row["token_reward"]
    scale = max((abs(s) for s in shifts), default=0.0)
    rank = {p: r + 1 for r, p in enumerate(row["coupled_positions"] or [])}
    spans = []
    for t, text in enumerate(texts):
        title = f"t={t} shift={shifts[t]:+.3f} reward={rewards[t]:.3f}" if t < len(shifts) else f"t={t}"
        cls = "tok coupled" if t in rank else "tok"
        mark = f'<span class="rank">{rank[t]}</span>' if t in rank else ""
        colour = _colour(shifts[t], scale) if t < len(shifts) else "transparent"
        spans.append(
            f'<span class="{cls}" style="background:{colour}" title="{html.escape(title)}">'
            f"{html.escape(text)}</span>{mark}"
        )
    return "".join(spans)


def _level_line(texts: list[str], replaced: dict[int, str]) -> str:
    spans = []
    for t, text in enumerate(texts):
        if t in replaced:
            title = html.escape(f"t={t} replaces {replaced[t]!r}")
            spans.append(f'<span class="tok repl" title="{title}">{html.escape(text)}</span>')
        else:
            spans.append(f'<span class="tok">{html.escape(text)}</span>')
    return "".join(spans)


def _row(label: str, line: str, *, title: str = "") -> str:
    """One table row: the label in its own column, never wrapped; the tokens beside it."""
    tip = f' title="{html.escape(title)}"' if title else ""
    return f'<tr><th class="label"{tip}>{html.escape(label)}</th><td class="line">{line}</td></tr>'


def example_html(row: dict, tokenizer: Any) -> str:
    """One example: question, y_w coloured by shift with coupled positions, then every kept level.

    The labels ("y_w (ref -0.68)", "level 1 (sim 0.93, ref -2.10)") form a table column that sizes to the
    longest label and never wraps, so every line of tokens starts at the same column.
    """
    ids = row["response_token_ids"]
    ref = row.get("ref_logps") or []
    rows = [_row(f"y_w (ref {ref[0]:.2f})", _preferred_line(row, _token_texts(tokenizer, ids[0])))]
    for j in range(row["num_levels"]):
        positions, originals = row["replaced_positions"][j], row["original_token_ids"][j]
        replaced = {p: tokenizer.decode([o]) for p, o in zip(positions, originals, strict=True)}
        label = f"level {j + 1} (sim {row['similarity'][j]:.2f}, ref {ref[j + 1]:.2f})"
        line = _level_line(_token_texts(tokenizer, ids[j + 1]), replaced)
        rows.append(_row(label, line, title=f"{len(positions)} tokens replaced"))
    return "\n".join(
        [
            f'<div class="ex"><div class="meta">{html.escape(str(row["id"]))}</div>',
            f'<div class="q">Q: {html.escape(row["question"])}</div>',
            '<table class="rows">',
            *rows,
            "</table></div>",
        ]
    )


def render(rows: Sequence[dict], tokenizer: Any, *, title: str = "HSCR rewards") -> str:
    """The whole page for ``rows`` (preference rows with at least the COLUMNS fields)."""
    legend = (
        "Tokens of y_w coloured by logit shift Δ_t = z_t[y_t] − z'_t[y_t] (green: supported by the image, "
        "red: preferred without it; hover for values). Boxed: modality-coupled positions (rank). "
        "Levels: replaced tokens in yellow (hover for the original), similarity to y_w, reference log-prob."
    )
    body = "\n".join(example_html(r, tokenizer) for r in rows)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class='meta'>{legend}</p>"
        f"{body}</body></html>"
    )


def write_reward_view(
    preferences: str | Path, model_dir: str | Path, path: str | Path, *, examples: int
) -> Path | None:
    """Render the first ``examples`` preference rows (shard order) to ``path``; None if there are none."""
    if examples <= 0 or not shard_files(preferences):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    for row in iter_rows(preferences, columns=COLUMNS):
        rows.append(row)
        if len(rows) >= examples:
            break
    path = Path(path)
    path.write_text(render(rows, tokenizer, title=f"HSCR rewards: {len(rows)} examples from {preferences}"))
    return path
