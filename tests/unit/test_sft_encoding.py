"""The SFT batch: labels on the answer and its end of turn only, the images processed once."""

from __future__ import annotations

import pytest
import torch

from hscr_platform.models.loading import IGNORE_INDEX, ModelConfig, encode_for_training, load_vlm, prompt_text

QUESTIONS = ["is there a nodule?", "describe the image.", "where is the mass?"]
ANSWERS = ["yes", "ct of the chest showing a nodule on the left.", "left"]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_vlm(ModelConfig(path=str(tiny_model_dir)))[1]


def test_labels_are_the_answer_tokens_and_the_end_of_turn(processor, noise_images, monkeypatch):
    images = [noise_images[i % 2] for i in range(3)]
    calls = []
    preprocess = processor.image_processor.preprocess
    monkeypatch.setattr(processor.image_processor, "preprocess", lambda *a, **k: calls.append(1) or preprocess(*a, **k))
    batch = encode_for_training(processor, images, QUESTIONS, ANSWERS)
    assert len(calls) == 1  # one pass over the images
    monkeypatch.undo()

    # the reference: each row's prompt encoded with its image, everything up to its length masked
    prompts = processor(images=images, text=[prompt_text(processor, q) for q in QUESTIONS])["input_ids"]
    expected = batch["input_ids"].clone()
    for i, prompt in enumerate(prompts):
        expected[i, : len(prompt)] = IGNORE_INDEX
    expected[batch["attention_mask"] == 0] = IGNORE_INDEX
    assert torch.equal(batch["labels"], expected)

    tok = processor.tokenizer
    for i, answer in enumerate(ANSWERS):
        kept = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(kept).strip() == f"{answer}</s>"
    assert (batch["labels"][0] != IGNORE_INDEX).sum() < (batch["labels"][1] != IGNORE_INDEX).sum()  # padding masked


def test_a_template_that_does_not_keep_the_prompt_as_a_prefix_is_refused(processor, noise_images, monkeypatch):
    from hscr_platform.models import loading

    monkeypatch.setattr(loading, "prompt_text", lambda proc, q: "ASSISTANT: nothing like the conversation")
    with pytest.raises(ValueError, match="row 0 is not a prefix"):
        encode_for_training(processor, noise_images[:1], QUESTIONS[:1], ANSWERS[:1])
