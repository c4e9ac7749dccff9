"""Evaluation metrics beyond the LLaVA-Med pair: grouping, report scores, hallucination, image reliance.

Pure functions of rows (SAMPLE_SCHEMA dicts, image not needed) and the model's predictions, aligned by index.
The score of a row is hscr.metrics' (via ``hscr_platform.models.answering.score_row``): a closed question scores
1/0 (the normalised answer occurs as whole words in the normalised prediction), an open or report answer
scores its token recall. All rates are fractions in [0, 1]; a rate with nothing to count is ``None``.

Report answers (``answer_type == "report"``):
- ``report_bleu``: sacreBLEU corpus BLEU (default 13a tokeniser, lower-cased) of the predictions against the
  one reference each, divided by 100;
- ``report_rouge_l``: mean over rows of the ROUGE-L F-measure (``rouge-score``, no stemming).

Hallucination (only rows with ground-truth ``findings``, i.e. SynthMed). A *claim* is a finding kind (nodule,
mass, effusion, cyst) that an answer says is in the image:
- open and report answers (except count questions): every kind named in the prediction, singular or plural,
  once per answer, unless the word right before it (articles dropped) is "no", "without" or "0"
  ("a nodule and two masses" claims nodule and mass; "no nodule" and "0 cysts" claim nothing);
- closed presence questions: the kind the question asks about, when the prediction's first yes/no is "yes";
- count questions ("how many cysts are there?"): the kind asked about, when the predicted number is >= 1.
A claim is *hallucinated* when the image has no finding of that kind. The *expected* claims of a row are the
claims its reference answer makes by the same rules, kept where the image has that kind (a "yes" presence
answer, a count >= 1, the kinds a reference report or abnormality answer names). Then, summed over rows:
- ``hallucination_rate`` = hallucinated claims / all claims (``None`` when the model named none), and
  ``claim_precision`` = 1 − that: of the findings the model named, the share that the image has;
- ``finding_recall`` = expected claims the prediction also makes / expected claims; ``hallucination_f1`` = the
  harmonic mean of claim precision and finding recall. Saying less raises precision and lowers recall;
- ``hallucinated_answer_rate`` = answers with at least one hallucinated claim / answers that make a claim;
  ``claiming_answer_rate`` = answers that make a claim / answers that could claim (every open, report,
  presence and count row with findings);
- ``hallucination_by_channel``: claims, hallucinated, rate, expected, recalled, recall per channel ("text",
  "presence", "count").

Closed-question matching (``closed_match``): ``contains`` (the normalised answer occurs in the prediction as
whole words) or ``strict`` (yes/no answers also need the prediction to contain no other yes/no word:
``hscr.metrics.closed_hit``); with ``strict`` the contains figure stays as ``closed_accuracy_contains``.

Image reliance: ``reliance_gap`` = a score with the real image minus the same score with the image replaced by
a mid-grey image of the same size. A blank image is out of distribution for a small model, so the gap is a
secondary figure; the language prior is measured on real images by the presence yes-rate against the truth
and the false-"yes" rate (``hscr_platform.models.answering.yes_bias``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal

from hscr.metrics import closed_hit, first_yes_no, normalize_answer, precision_recall_f1
from hscr_platform.data.schema import ANSWER_TYPES
from hscr_platform.data.synthmed.questions import PLURAL
from hscr_platform.data.synthmed.render import KINDS
from hscr_platform.models.answering import score_row, summarize

KIND_WORDS: dict[str, str] = {**{k: k for k in KINDS}, **{PLURAL[k]: k for k in KINDS}}  # word -> kind
NEGATORS = frozenset({"no", "without", "0"})
CHANNELS = ("text", "presence", "count")
ClosedMatch = Literal["contains", "strict"]


# --- parsing finding kinds ------------------------------------------------------------------------------


def mentioned_kinds(text: str) -> list[str]:
    """Kinds named affirmatively in ``text``, each once, in order of first mention (see the module doc)."""
    words = normalize_answer(text).split()
    found: list[str] = []
    for i, word in enumerate(words):
        kind = KIND_WORDS.get(word)
        negated = i > 0 and words[i - 1] in NEGATORS
        if kind is not None and not negated and kind not in found:
            found.append(kind)
    return found


def question_kind(question: str) -> str | None:
    """The one kind a question asks about ("is there a mass?" -> "mass"); ``None`` for none or several."""
    kinds = {KIND_WORDS[w] for w in normalize_answer(question).split() if w in KIND_WORDS}
    return kinds.pop() if len(kinds) == 1 else None


def predicted_count(prediction: str) -> int | None:
    """The first number in the normalised prediction ("two nodules" -> 2), or ``None``."""
    return next((int(w) for w in normalize_answer(prediction).split() if w.isdigit()), None)


def claim_channel(row: dict) -> str | None:
    """Which rule finds the claims of ``row``'s answer: "text", "presence", "count"; ``None``: no claims."""
    if row.get("findings") is None:
        return None
    if row.get("question_type") == "count":
        return "count"
    if row.get("question_type") == "presence" and row["answer_type"] == "closed":
        return "presence"
    return "text" if row["answer_type"] in ("open", "report") else None


def finding_claims(row: dict, prediction: str) -> list[str]:
    """The finding kinds that ``prediction`` says the image of ``row`` has (see the module doc)."""
    channel = claim_channel(row)
    if channel == "text":
        return mentioned_kinds(prediction)
    kind = question_kind(row["question"]) if channel else None
    if kind is None:
        return []
    if channel == "presence":
        return [kind] if first_yes_no(prediction) == "yes" else []
    count = predicted_count(prediction)
    return [kind] if count is not None and count >= 1 else []


def hallucinated_claims(row: dict, prediction: str) -> list[str]:
    """The claims of ``prediction`` about kinds that ``row``'s image does not have."""
    present = {f["kind"] for f in row.get("findings") or ()}
    return [k for k in finding_claims(row, prediction) if k not in present]


def expected_claims(row: dict) -> list[str]:
    """The claims ``row``'s reference answer makes about kinds its image has: what a complete answer names."""
    present = {f["kind"] for f in row.get("findings") or ()}
    return [k for k in finding_claims(row, row["answer"]) if k in present]


def hallucination(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, Any]:
    """Claim precision, finding recall and F1, hallucination rates, per-channel counts (module doc)."""
    counts: dict[str, dict[str, int]] = {c: defaultdict(int) for c in CHANNELS}
    answers = claiming = bad_answers = 0
    for row, pred in zip(rows, predictions, strict=True):
        channel = claim_channel(row)
        if channel is None:
            continue
        made, bad, expected = finding_claims(row, pred), hallucinated_claims(row, pred), expected_claims(row)
        answers, claiming, bad_answers = answers + 1, claiming + bool(made), bad_answers + bool(bad)
        tally = counts[channel]
        tally["claims"] += len(made)
        tally["hallucinated"] += len(bad)
        tally["expected"] += len(expected)
        tally["recalled"] += len(set(made) & set(expected))
    if not answers:
        return {}
    total = {k: sum(c[k] for c in counts.values()) for k in ("claims", "hallucinated", "expected", "recalled")}
    scores = precision_recall_f1(correct=total["claims"] - total["hallucinated"], claimed=total["claims"],
                                 recalled=total["recalled"], expected=total["expected"])  # fmt: skip
    return {
        "hallucination_rate": _ratio(total["hallucinated"], total["claims"]),
        "claim_precision": _round(scores["precision"]),
        "finding_recall": _round(scores["recall"]),
        "hallucination_f1": _round(scores["f1"]),
        "hallucinated_answer_rate": _ratio(bad_answers, claiming),
        "claiming_answer_rate": _ratio(claiming, answers),
        "hallucination_claims": total["claims"],
        "expected_claims": total["expected"],
        "hallucination_answers": answers,
        "claiming_answers": claiming,
        "hallucination_by_channel": {c: _channel_entry(counts[c]) for c in CHANNELS},
    }


def _channel_entry(tally: dict[str, int]) -> dict[str, Any]:
    return {"claims": tally["claims"], "hallucinated": tally["hallucinated"],
            "rate": _ratio(tally["hallucinated"], tally["claims"]), "expected": tally["expected"],
            "recalled": tally["recalled"], "recall": _ratio(tally["recalled"], tally["expected"])}  # fmt: skip


# --- report answers: BLEU and ROUGE-L --------------------------------------------------------------------


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """sacreBLEU corpus BLEU / 100 (13a tokeniser, lower-cased); ``None`` for no rows."""
    import sacrebleu

    if not predictions:
        return None
    score = sacrebleu.corpus_bleu(list(predictions), [list(references)], lowercase=True).score
    return round(score / 100, 4)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F-measure (rouge-score, no stemming); ``None`` for no rows."""
    from rouge_score import rouge_scorer

    if not predictions:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = zip(predictions, references, strict=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    return round(sum(scores) / len(scores), 4)


def report_scores(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, Any]:
    """BLEU and ROUGE-L of the report answers (``answer_type == "report"``); empty when there are none."""
    pairs = [(p, r["answer"]) for r, p in zip(rows, predictions, strict=True) if r["answer_type"] == "report"]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {"report_n": len(pairs), "report_bleu": bleu(preds, refs), "report_rouge_l": rouge_l(preds, refs)}


# --- aggregation ---------------------------------------------------------------------------------------


def row_score(row: dict, prediction: str, *, closed_match: ClosedMatch = "contains") -> float:
    """A row's score: closed 1/0 by ``closed_match`` (module doc), open and report answers their recall."""
    if row["answer_type"] == "closed" and closed_match == "strict":
        return float(closed_hit(prediction, row["answer"], strict=True))
    return score_row(row, prediction)


def group_scores(
    rows: Sequence[dict],
    predictions: Sequence[str],
    key: Callable[[dict], str],
    *,
    closed_match: ClosedMatch = "contains",
) -> dict[str, dict[str, Any]]:
    """Per group (``key(row)``, sorted): rows, and per answer type as in the overall figures: closed accuracy,
    open recall, report recall, each with its row count."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: {t: [] for t in ANSWER_TYPES})
    for row, pred in zip(rows, predictions, strict=True):
        groups[key(row)][row["answer_type"]].append(row_score(row, pred, closed_match=closed_match))
    return {name: _group_entry(g) for name, g in sorted(groups.items())}


def _group_entry(scores: dict[str, list[float]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"n": sum(len(v) for v in scores.values())}
    for answer_type, metric in (
        ("closed", "closed_accuracy"),
        ("open", "open_recall"),
        ("report", "report_recall"),
    ):
        entry[f"{answer_type}_n"] = len(scores[answer_type])
        entry[metric] = _mean(scores[answer_type])
    return entry


def model_metrics(
    rows: Sequence[dict], predictions: Sequence[str], *, closed_match: ClosedMatch = "contains"
) -> dict[str, Any]:
    """Everything one model's answers score: the LLaVA-Med pair overall, per source and per type, the presence
    bias figures, report BLEU / ROUGE-L, and the hallucination figures where findings are known."""
    metrics = summarize(rows, predictions)
    metrics["closed_match"] = closed_match
    if closed_match == "strict":  # closed figures re-scored; open / report scores and the yes-bias are the same
        scored = [(r, row_score(r, p, closed_match="strict")) for r, p in zip(rows, predictions, strict=True)]
        by_type: dict[str, list[float]] = defaultdict(list)
        for row, score in scored:
            by_type[str(row.get("question_type") or row["answer_type"])].append(score)
        metrics["closed_accuracy_contains"] = metrics["closed_accuracy"]
        metrics["closed_accuracy"] = _mean([score for row, score in scored if row["answer_type"] == "closed"])
        metrics["per_type"] = {t: {"n": len(v), "score": _mean(v)} for t, v in sorted(by_type.items())}
    metrics["per_source"] = group_scores(rows, predictions, lambda r: str(r.get("source") or "unknown"),
                                         closed_match=closed_match)  # fmt: skip
    metrics.update(report_scores(rows, predictions))
    metrics.update(hallucination(rows, predictions))
    return metrics


GAP_KEYS = ("closed_accuracy", "open_recall", "presence_accuracy")


def reliance_gap(with_image: dict[str, Any], blanked: dict[str, Any]) -> dict[str, Any]:
    """Score with the image minus score with a blank image, per ``GAP_KEYS`` (``None`` where either is
    missing), plus the blank-image presence yes-rate (how the model answers when there is nothing to see)."""
    gap = {f"reliance_gap_{k}": _diff(with_image.get(k), blanked.get(k)) for k in GAP_KEYS}
    gap["blank_presence_yes_rate"] = blanked.get("presence_yes_rate")
    return gap


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# --- per-row records ----------------------------------------------------------------------------------


def row_records(rows: Sequence[dict], predictions: Sequence[str], *, model: str, view: str) -> list[dict[str, Any]]:
    """One record per row for the predictions table: what was asked, the truth, the answer, score, claims."""
    return [_record(r, p, model=model, view=view) for r, p in zip(rows, predictions, strict=True)]


def _record(r: dict, p: str, *, model: str, view: str) -> dict[str, Any]:
    return {
        "model": model, "view": view, "id": r["id"], "source": r.get("source"),
        "question_type": r.get("question_type"), "answer_type": r["answer_type"],
        "question": r["question"], "answer": r["answer"], "prediction": p, "score": score_row(r, p),
        "claims": finding_claims(r, p), "hallucinated": hallucinated_claims(r, p),
    }  # fmt: skip
