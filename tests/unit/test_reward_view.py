"""The HTML reward view: labels stay on one line, tokens and levels are all there."""

from __future__ import annotations

from html.parser import HTMLParser

from hscr_platform.generation.reward_view import STYLE, example_html, render


class _Words:
    """A tokenizer stand-in: id i decodes to WORDS[i]."""

    WORDS = ("</s>", " a", " cyst", " an", " mass", " left", ".")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.WORDS[i] for i in ids)


class _Cells(HTMLParser):
    """Text of every <th class="label"> cell, and of every <td class="line"> cell."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[str] = []
        self.lines: list[str] = []
        self._into: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        cls = dict(attrs).get("class")
        if (tag, cls) in {("th", "label"), ("td", "line")}:
            self._into = self.labels if tag == "th" else self.lines
            self._into.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"th", "td"}:
            self._into = None

    def handle_data(self, data: str) -> None:
        if self._into is not None:
            self._into[-1] += data


ROW = {
    "id": "ex-1",
    "question": "what is seen?",
    "responses": ["a cyst left.", "an mass left."],
    "response_token_ids": [[1, 2, 5, 6, 0], [3, 4, 5, 6, 0]],
    "num_levels": 1,
    "similarity": [0.93],
    "replaced_positions": [[0, 1]],
    "original_token_ids": [[1, 2]],
    "coupled_positions": [2, 1],
    "token_shift": [0.1, 1.5, 2.0, 0.0, 0.3],
    "token_reward": [0.5, 0.9, 0.95, 1.0, 0.4],
    "ref_logps": [-0.68, -2.1],
}


def test_labels_are_one_unwrapped_column():
    page = render([ROW], _Words())
    cells = _Cells()
    cells.feed(page)
    # Each label is whole in its own cell (the old inline-block of 9em broke "y_w (ref" / "-0.68)").
    assert cells.labels == ["y_w (ref -0.68)", "level 1 (sim 0.93, ref -2.10)"]
    # y_w's line carries the coupling ranks after the coupled tokens (" left" first, " cyst" second).
    assert cells.lines == [" a cyst2 left1.</s>", " an mass left.</s>"]
    label_rule = next(line for line in STYLE.splitlines() if ".label" in line)
    assert "white-space: nowrap" in label_rule and "width: 9em" not in STYLE


def test_example_marks_coupled_and_replaced_tokens():
    block = example_html(ROW, _Words())
    assert block.count('class="tok coupled"') == 2 and block.count('class="rank"') == 2
    assert block.count('class="tok repl"') == 2 and "replaces &#x27; a&#x27;" in block
    assert 'title="2 tokens replaced"' in block
