"""The per-example work of preference generation: scoring, decoding, re-ranking, reference log-probs.

A :class:`Worker` loads the model (and the decoder / similarity model its stages need) once, then processes
lists of pipeline states: dicts that each stage extends (``scored`` -> ``candidates`` -> ``preference``) or
ends with a ``reject``. Each chunk's rows are cut into fixed micro-batches (``compute.batch_size``, in row
order), so results do not depend on how Ray Data schedules blocks. A micro-batch that raises is retried row by
row and a row that still fails becomes a ``processing_error`` reject: one bad row never fails a batch.
No Ray here: the actors in ``generate_pipeline`` and the benchmark drive it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from hscr.rerank import select_levels
from hscr_platform.generation.job import GenerateJobConfig, model_config
from hscr_platform.generation.similarity import CoupledSimilarity, near_copy
from hscr_platform.models.engines.decoding import ContinuationRequest, Decoder
from hscr_platform.models.engines.hf import HFDecoder
from hscr_platform.models.engines.vllm import EngineDied

ANSWER_TOO_LONG = "answer_too_long"  # image + prompt + y_w exceed the model's limit (never truncated)
NO_COUPLED = "no_coupled_positions"  # y_w has no eligible position (special / punctuation only)
NO_REPLACEMENT = "no_replacement"  # no coupled position has a plausible hallucinated token
NO_LEVEL = "no_level_after_rerank"  # every candidate is y_w's text (normalised), or re-ranking kept none
PROCESSING_ERROR = "processing_error"  # the row raised inside a stage (detail: the exception)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs (pickled to it): the config, the model folder, what rows are stamped with."""

    cfg: GenerateJobConfig
    model_dir: str
    fingerprint: str  # model_fingerprint(model_dir, dtype=...): files + template + dtype + attention kernel
    config_hash: str


def reject(state: dict, reason: str, detail: str) -> dict:
    return {"reject": {"id": state["id"], "source": state.get("source") or "", "reason": reason, "detail": detail}}


def micro_batches(states: Sequence[dict], size: int) -> Iterator[list[dict]]:
    """Rows still in flight, per chunk in row order, cut into lists of at most ``size``."""
    live = sorted((s for s in states if "reject" not in s), key=lambda s: (s["chunk"], s["row"]))
    for _, group in groupby(live, key=lambda s: s["chunk"]):
        rows = list(group)
        yield from (rows[i : i + size] for i in range(0, len(rows), size))


def guarded(fn: Callable[[list[dict]], list[dict]], batch: list[dict]) -> None:
    """Apply ``fn`` (returns one update per row) to a micro-batch; on an error retry row by row."""
    try:
        updates = fn(batch)
    except EngineDied:  # not the rows' fault: the caller restarts the engine or stops without committing
        raise
    except Exception as exc:  # any failure of one row must not fail its batch
        if len(batch) == 1:
            batch[0].update(reject(batch[0], PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            return
        for state in batch:
            guarded(fn, [state])
        return
    for state, update in zip(batch, updates, strict=True):
        state.update(update)


def eos_ids(model_dir: str, tokenizer: Any) -> set[int]:
    """End-of-sequence ids from the folder's generation config (int or list), else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _stored_reference(state: dict, chosen: list[dict]) -> list[list[float]] | None:
    """[y_w, levels...] per-token reference log-probs kept from scoring and decoding, if all were kept."""
    found = [state.get("ref_token_logps"), *(c.get("ref_token_logps") for c in chosen)]
    return None if any(lp is None for lp in found) else [list(lp) for lp in found if lp is not None]


class Worker:
    """The per-example work of one or more stages (``parts`` ⊆ score, decode, finish), models loaded once."""

    def __init__(self, spec: WorkerSpec, *, parts: Collection[str]):
        from hscr_platform.generation.scoring import excluded_token_ids, model_token_limit
        from hscr_platform.generation.similarity import build_similarity

        cfg = spec.cfg
        torch.set_num_threads(cfg.compute.torch_threads)
        self.spec, self.cfg, self.parts = spec, cfg, set(parts)
        self.timings: dict[str, float] = defaultdict(float)
        self.model, self.processor, config = self._load()
        self.tokenizer = self.processor.tokenizer
        self.eos_ids = eos_ids(spec.model_dir, self.tokenizer)
        self.limit = model_token_limit(config, cfg.model.max_tokens)
        self.excluded = excluded_token_ids(self.tokenizer) if "score" in parts else None
        self.engine = self._vllm_engine()  # one vLLM engine for this actor's vLLM scorer and decoder, if any
        self.vllm_scorer = self._vllm_scorer() if self.uses_vllm("score") else None
        self.decoder = self._decoder() if "decode" in parts else None
        self.similarity = build_similarity(cfg.similarity) if "finish" in parts else None

    def uses_vllm(self, part: str) -> bool:
        """Whether this actor runs ``part`` (score / decode) on its vLLM engine."""
        engine = {"score": self.cfg.scorer.engine, "decode": self.cfg.decoder.engine}.get(part)
        return part in self.parts and engine == "vllm"

    def _load(self) -> tuple[Any, Any, Any]:
        """(HF model or None, processor, model config): an actor whose every model part runs on vLLM loads no
        HF language model (a vLLM scorer loads the vision tower + projector only, in ``_vllm_scorer``)."""
        from hscr_platform.models.loading import load_vlm

        model_cfg = model_config(self.cfg.model, Path(self.spec.model_dir))
        if "finish" in self.parts or any(p in self.parts and not self.uses_vllm(p) for p in ("score", "decode")):
            model, processor = load_vlm(model_cfg)
            if torch.cuda.is_available():  # Ray exposes a GPU only to actors that reserved one
                model = model.to("cuda")
            return model, processor, model.config
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        return None, processor, AutoConfig.from_pretrained(model_cfg.path)

    def _vllm_engine(self) -> Any:
        """The actor's vLLM engine (``decoder.vllm`` settings; image embeddings and top-K log-probs on when
        it scores), or None when no part runs on vLLM."""
        if not (self.uses_vllm("score") or self.uses_vllm("decode")):
            return None
        from hscr_platform.models.engines.vllm import VllmEngine, vllm_engine_config

        top_k = self.cfg.scorer.top_k if self.uses_vllm("score") else None
        return VllmEngine(self.spec.model_dir, vllm_engine_config(self.cfg.decoder.vllm, self.cfg.model, top_k=top_k))

    def _vllm_scorer(self) -> Any:
        from hscr_platform.generation.vllm_scoring import VisionEncoder, VllmScorer

        if self.model is not None:
            encoder = VisionEncoder(model=self.model, processor=self.processor)
        else:
            encoder = VisionEncoder(model_config(self.cfg.model, Path(self.spec.model_dir)))
        return VllmScorer(self.engine, encoder, cfg=self.cfg.hscr, top_k=self.cfg.scorer.top_k, excluded=self.excluded)

    def _decoder(self) -> Decoder:
        if self.cfg.decoder.engine == "transformers":
            return HFDecoder(self.model, self.processor, reuse_prefix=self.cfg.decoder.reuse_prefix)
        from hscr_platform.models.engines.vllm import VllmDecoder

        return VllmDecoder(self.spec.model_dir, engine=self.engine)

    @torch.no_grad()
    def run(self, states: list[dict], part: str) -> None:
        """Apply ``part`` to every live row, micro-batch by micro-batch. A vLLM engine that dies is restarted
        once per micro-batch and the micro-batch redone; dying again raises EngineDied (the chunk is then not
        committed: the actor fails, the job stops, a rerun redoes the chunk)."""
        fn = {"score": self._score, "decode": self._decode, "finish": self._finish}[part]
        for batch in micro_batches(states, self.cfg.compute.batch_size):
            try:
                guarded(fn, batch)
            except EngineDied as exc:
                if self.engine is None:
                    raise
                print(f"[generate] vLLM engine died ({exc}); restarting it and redoing the batch", flush=True)
                self.engine.restart()
                guarded(fn, [s for s in batch if "reject" not in s])

    # --- stage 1: two-view scoring ------------------------------------------------------------------

    def _score(self, batch: list[dict]) -> list[dict]:
        from hscr_platform.generation.scoring import response_token_ids, score_batch
        from hscr_platform.models.loading import open_image
        from hscr_platform.models.logprobs import encode_prefixes

        t0 = time.perf_counter()
        images = [open_image(s["image"]) for s in batch]
        questions = [s["question"] for s in batch]
        responses = [
            response_token_ids(self.processor, s["question"], s["answer"], eos_ids=self.eos_ids) for s in batch
        ]
        prompt_lens = encode_prefixes(self.processor, images, questions)["attention_mask"].sum(-1).tolist()
        fit = [i for i, r in enumerate(responses) if prompt_lens[i] + len(r) <= self.limit]
        updates = [
            reject(
                s,
                ANSWER_TOO_LONG,
                f"{prompt_lens[i]} prompt + {len(responses[i])} answer tokens > {self.limit}",
            )
            for i, s in enumerate(batch)
        ]  # replaced below for the rows that fit
        if fit and self.vllm_scorer is not None:  # vLLM log-probs: y_w's reference log-probs come from the finisher
            scored_all = self.vllm_scorer.score(
                [images[i] for i in fit],
                [questions[i] for i in fit],
                [responses[i] for i in fit],
                ids_of=[batch[i]["id"] for i in fit],
            )
            for scored, i in zip(scored_all, fit, strict=True):
                updates[i] = self._scored_update(batch[i], scored, responses[i], prompt_lens[i])
        elif fit:
            results = score_batch(
                self.model,
                self.processor,
                [images[i] for i in fit],
                [questions[i] for i in fit],
                [responses[i] for i in fit],
                ids_of=[batch[i]["id"] for i in fit],
                cfg=self.cfg.hscr,
                excluded=self.excluded,
            )  # per example: logits made and freed one example at a time, on the model's device
            for (scored, y_w_logps), i in zip(results, fit, strict=True):
                updates[i] = self._scored_update(batch[i], scored, responses[i], prompt_lens[i])
                if self.cfg.decoder.reuse_prefix and "scored" in updates[i]:  # y_w's reference log-probs
                    updates[i]["ref_token_logps"] = y_w_logps
        self.timings["score"] += time.perf_counter() - t0
        return updates

    @staticmethod
    def _scored_update(state: dict, scored: Any, response: list[int], prompt_len: int) -> dict:
        if not scored.coupled:
            return reject(state, NO_COUPLED, f"no eligible position among {len(response)} tokens")
        if not scored.levels:
            return reject(state, NO_REPLACEMENT, f"none of {len(scored.coupled)} coupled positions has a replacement")
        return {"scored": scored, "response_ids": response, "prompt_len": prompt_len}

    # --- stage 2: forced replacements + greedy continuation -----------------------------------------

    def _decode(self, batch: list[dict]) -> list[dict]:
        from hscr_platform.generation.scoring import forced_prefix
        from hscr_platform.models.loading import open_image

        assert self.decoder is not None
        t0 = time.perf_counter()
        requests: list[ContinuationRequest] = []
        owner: list[tuple[int, int]] = []
        for i, s in enumerate(batch):
            image, scored = open_image(s["image"]), s["scored"]
            for level in range(len(scored.levels)):
                forced = forced_prefix(s["response_ids"], scored, level)
                budget = max(0, min(self.cfg.decoder.max_new_tokens, self.limit - s["prompt_len"] - len(forced)))
                requests.append(
                    ContinuationRequest(
                        example_id=f"{s['chunk']}:{s['row']}",
                        image=image,
                        question=s["question"],
                        forced=tuple(forced),
                        max_new_tokens=budget,
                    )
                )
                owner.append((i, level))
        scored_outs = self._continue(requests)
        updates: list[dict] = [{"candidates": []} for _ in batch]
        for (i, level), (out, forced_logps) in zip(owner, scored_outs, strict=True):
            text = self.tokenizer.decode(list(out.token_ids), skip_special_tokens=True).strip()
            candidate = {"level": level, "token_ids": list(out.token_ids), "text": text}
            if forced_logps is not None:  # the decoding model is the reference: its log-probs are the ref's
                candidate["ref_token_logps"] = [*forced_logps, *out.logprobs]
            updates[i]["candidates"].append(candidate)
        self.timings["decode"] += time.perf_counter() - t0
        return updates

    def _continue(self, requests: list[ContinuationRequest]) -> list[tuple[Any, Any]]:
        """Continuations, with forced-token log-probs where the engine is the HF reference model itself."""
        assert self.decoder is not None
        if self.cfg.decoder.reuse_prefix and isinstance(self.decoder, HFDecoder):
            return list(self.decoder.continue_greedy_scored(requests))
        return [(out, None) for out in self.decoder.continue_greedy(requests)]

    # --- re-rank + reference log-probs ----------------------------------------------------------------

    def _finish(self, batch: list[dict]) -> list[dict]:
        assert self.similarity is not None
        t0 = time.perf_counter()
        pools = [[c for c in s["candidates"] if not near_copy(c["text"], s["answer"])] for s in batch]
        if isinstance(self.similarity, CoupledSimilarity):  # token ids against the scoring stage's coupled positions
            sims = [
                self.similarity.token_similarities(
                    s["response_ids"],
                    s["scored"].coupled,
                    [(c["token_ids"], s["scored"].levels[c["level"]]) for c in p],
                )
                for s, p in zip(batch, pools, strict=True)
            ]
        else:
            sims = self.similarity.many(
                [(s["answer"].strip(), [c["text"] for c in p]) for s, p in zip(batch, pools, strict=True)]
            )
        hscr = self.cfg.hscr
        kept = [select_levels(x, k=hscr.k, min_gap=hscr.min_gap, max_similarity=hscr.max_similarity) for x in sims]
        self.timings["rerank"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        updates = [
            reject(
                s,
                NO_LEVEL,
                f"{len(s['candidates'])} candidates, {len(s['candidates']) - len(p)} copies of y_w, "
                f"similarities {[round(v, 3) for v in x]}",
            )
            for s, p, x in zip(batch, pools, sims, strict=True)
        ]
        ok = [i for i, k in enumerate(kept) if k]
        if ok:
            chosen = [[pools[i][c] for c in kept[i]] for i in ok]
            refs = self._reference([batch[i] for i in ok], chosen)
            for j, i in enumerate(ok):
                similarity = [sims[i][c] for c in kept[i]]
                updates[i] = {"preference": self._row(batch[i], chosen[j], similarity, refs[j])}
        self.timings["reference"] += time.perf_counter() - t0
        return updates

    def _reference(self, batch: list[dict], chosen: list[list[dict]]) -> list[tuple[list[float], list[list[float]]]]:
        """Reference summed and per-token log-probs of [y_w, kept levels...] per example.

        Reused from scoring (y_w) and decoding (levels) when both come from the reference model itself;
        otherwise one forward with the image + prompt prefix shared (or, as the naive baseline, not shared).
        """
        stored = [_stored_reference(s, c) for s, c in zip(batch, chosen, strict=True)]
        if all(per_example is not None for per_example in stored):
            return [([float(sum(lp)) for lp in per_example], per_example) for per_example in stored if per_example]
        from hscr_platform.models.loading import open_image
        from hscr_platform.models.logprobs import encode_prefixes, separate_logps, shared_prefix_logps

        responses = [
            r for s, c in zip(batch, chosen, strict=True) for r in [s["response_ids"], *(x["token_ids"] for x in c)]
        ]
        owner = [j for j, c in enumerate(chosen) for _ in range(1 + len(c))]
        prefix = encode_prefixes(
            self.processor, [open_image(s["image"]) for s in batch], [s["question"] for s in batch]
        )
        prefix = {k: v.to(self.model.device) for k, v in prefix.items()}
        fn = shared_prefix_logps if self.cfg.decoder.reuse_prefix else separate_logps
        logps, token_logps, _ = fn(self.model, prefix, responses, owner, pad_id=int(self.tokenizer.pad_token_id))
        out: list[tuple[list[float], list[list[float]]]] = [([], []) for _ in batch]
        for r, (j, ids) in enumerate(zip(owner, responses, strict=True)):
            out[j][0].append(float(logps[r]))
            out[j][1].append(token_logps[r, : len(ids)].tolist())
        return out

    def _row(self, s: dict, chosen: list[dict], similarity: list[float], ref: tuple) -> dict[str, Any]:
        """One PREFERENCE_SCHEMA row: y_w ≻ chosen[0] ≻ chosen[1] ≻ ..."""
        scored, response = s["scored"], s["response_ids"]
        positions = [list(scored.levels[c["level"]]) for c in chosen]
        return {
            "id": s["id"],
            "source": s["source"],
            "image": s["image"],
            "question": s["question"],
            "answer_type": s.get("answer_type"),
            "question_type": s.get("question_type"),
            "responses": [s["answer"], *(c["text"] for c in chosen)],
            "response_token_ids": [response, *(c["token_ids"] for c in chosen)],
            "num_levels": len(chosen),
            "similarity": similarity,
            "replaced_positions": positions,
            "original_token_ids": [[response[p] for p in ps] for ps in positions],
            "replacement_token_ids": [[scored.replacements[p] for p in ps] for ps in positions],
            "coupled_positions": scored.coupled,
            "token_shift": scored.shift,
            "token_reward": scored.reward,
            "ref_logps": ref[0],
            "ref_token_logps": ref[1],
            "ref_fingerprint": self.spec.fingerprint,
            "config_hash": self.spec.config_hash,
        }
