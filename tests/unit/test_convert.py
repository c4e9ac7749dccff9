"""jobs.convert on a tiny original-layout LLaVA checkpoint: the llava-hf folder gives the original model's
logits, and the loader's checks refuse bad folders (original layout, unknown architecture, no processor,
pickle weights) with a clear message, before any Ray work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from original_llava import original_logits, write_original_llava
from PIL import Image

from hscr_platform.models.loading import ModelConfig, check_vlm_folder, load_vlm, prompt_text

TINY = "jobs/configs/convert/tiny.yaml"


def _convert(tmp_path, source, *extra):
    from jobs.convert import main

    out = tmp_path / "hf"
    main(["--config", TINY, f"source.path={source}", f"output.path={out}", *extra])
    return out


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def _assert_same_logits(original, out, question="is there a nodule?"):
    """The converted model's logits equal the original forward's on the original vocabulary."""
    model, processor = load_vlm(ModelConfig(path=str(out)))
    image = _image()
    batch = processor(images=[image], text=[prompt_text(processor, question) + " yes"], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    first, count = ids.index(image_id), ids.count(image_id)
    assert count == 16  # (32 / 8)^2 patches, CLS dropped ("patch")
    with torch.no_grad():
        got = model(**batch).logits[0]  # (L, V + added)
    spliced = [*ids[:first], 0, *ids[first + count :]]  # one image position, as the original code sees it
    want = original_logits(original, spliced, first, batch["pixel_values"])  # (L, V)
    vocab = want.shape[-1]
    assert got.shape == (len(ids), vocab + 2)  # <image> and <pad> added
    torch.testing.assert_close(got[:, :vocab], want, atol=1e-5, rtol=1e-5)
    return model, processor


@pytest.mark.parametrize(("family", "tower_in_checkpoint"), [("mistral", True), ("llama", False)])
def test_conversion_keeps_the_logits(tmp_path, family, tower_in_checkpoint, capsys):
    original = write_original_llava(tmp_path / "src", family=family, tower_in_checkpoint=tower_in_checkpoint)
    out = _convert(tmp_path, original.folder)
    assert "jobs.convert: wrote" in capsys.readouterr().out
    assert check_vlm_folder(out) == out and list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["model_type"] == family and config["vision_feature_layer"] == -2
    processor = _assert_same_logits(original, out)[1]
    prompt = prompt_text(processor, "is there a nodule?")
    want = {"mistral": "[INST] <image>\nis there a nodule? [/INST]", "llama": "USER: <image>\nis there a nodule?"}
    assert want[family] in prompt


def test_pickle_weights_need_the_flag(tmp_path, capsys):
    original = write_original_llava(tmp_path / "src", pickle=True)
    with pytest.raises(SystemExit) as exc:
        _convert(tmp_path, original.folder)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "only pickle weights (pytorch_model.bin)" in err and "allow_pickle=true" in err
    assert not (tmp_path / "hf").exists()  # nothing written
    out = _convert(tmp_path, original.folder, "source.allow_pickle=true")
    assert not list(out.glob("*.bin"))  # written as safetensors
    _assert_same_logits(original, out)


def test_vision_tower_override_and_a_missing_tower(tmp_path, capsys):
    original = write_original_llava(tmp_path / "src", tower_in_checkpoint=False)
    config = json.loads((original.folder / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # a hub name, as the released checkpoints say
    (original.folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        _convert(tmp_path, original.folder)
    err = capsys.readouterr().err
    assert "'openai/clip-vit-large-patch14-336' (mm_vision_tower) is not a local folder" in err
    assert "set source.vision_tower=<folder>" in err
    out = _convert(tmp_path, original.folder, f"source.vision_tower={original.tower_dir}")
    _assert_same_logits(original, out)


def test_unsupported_original_options_are_named(tmp_path, capsys):
    original = write_original_llava(tmp_path / "src")
    config = json.loads((original.folder / "config.json").read_text())
    (original.folder / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(SystemExit):
        _convert(tmp_path, original.folder)
    assert "mm_projector_type='linear' is not supported" in capsys.readouterr().err


# --- the loader's checks (every job runs them before Ray starts) -------------------------------------------


def test_loader_refuses_an_original_layout_checkpoint(tmp_path):
    original = write_original_llava(tmp_path / "src")
    with pytest.raises(
        ValueError, match=r"original-layout LLaVA checkpoint \(LlavaMistralForCausalLM\).*jobs\.convert"
    ):
        check_vlm_folder(original.folder)


def test_loader_refuses_unknown_architecture_pickles_and_missing_processor(tmp_path, tiny_model_dir):
    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        edit(folder)
        return folder

    def other_arch(folder):
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["Blip2ForConditionalGeneration"]
        (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(
        ValueError, match=r"architecture 'Blip2ForConditionalGeneration' \(config\.json\) is not supported"
    ):
        check_vlm_folder(variant("blip", other_arch))

    def to_pickle(folder):
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()

    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        check_vlm_folder(variant("pickle", to_pickle))
    with pytest.raises(ValueError, match="has no processor"):
        check_vlm_folder(variant("noproc", lambda f: (f / "processor_config.json").unlink()))
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_vlm_folder(variant("notok", lambda f: (f / "tokenizer.json").unlink()))
    assert check_vlm_folder(tiny_model_dir) == tiny_model_dir
