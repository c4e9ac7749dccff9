"""Every reader stays inside the dataset root it was given: an image path that resolves outside it (``../``,
an absolute path elsewhere, a symlink pointing out) is rejected as image_outside_root, never read."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hscr_platform.data.readers import READERS
from hscr_platform.data.readers._common import IMAGE_OUTSIDE_ROOT
from hscr_platform.data.readers.llava_med import read_llava_med
from hscr_platform.data.readers.pathvqa import read_pathvqa
from hscr_platform.data.readers.slake import read_slake
from hscr_platform.data.readers.tabular import read_jsonl, read_parquet
from hscr_platform.data.readers.vqa_rad import OSF_IMAGES, OSF_JSON, read_vqa_rad, read_vqa_rad_mevf
from hscr_platform.data.samples import Reject, validate_sample


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def qa(index: int) -> tuple[str, str]:
    return f"question {index}?", "yes"


def _osf(root: Path, names: list[str]) -> Iterator:
    records = [{"qid": i, "question": qa(i)[0], "answer": qa(i)[1], "image_name": n} for i, n in enumerate(names)]
    (root / OSF_JSON).write_text(json.dumps(records))
    return read_vqa_rad(root)


def _mevf(root: Path, names: list[str]) -> Iterator:
    records = [{"qid": i, "question": qa(i)[0], "answer": qa(i)[1], "image_name": n} for i, n in enumerate(names)]
    (root / "trainset.json").write_text(json.dumps(records))
    return read_vqa_rad_mevf(root)


def _slake(root: Path, names: list[str]) -> Iterator:
    records = [
        {"qid": i, "question": qa(i)[0], "answer": qa(i)[1], "img_name": n, "q_lang": "en"} for i, n in enumerate(names)
    ]
    (root / "train.json").write_text(json.dumps(records))
    return read_slake(root)


def _conversation(i: int, name: str) -> dict:
    turns = [{"from": "human", "value": "<image>\n" + qa(i)[0]}, {"from": "gpt", "value": qa(i)[1]}]
    return {"id": str(i), "image": name, "conversations": turns}


def _llava_med(root: Path, names: list[str]) -> Iterator:
    (root / "llava_med_instruct_train.json").write_text(json.dumps([_conversation(i, n) for i, n in enumerate(names)]))
    return read_llava_med(root)


def _llava_med_jsonl(root: Path, names: list[str]) -> Iterator:
    lines = [json.dumps(_conversation(i, n)) for i, n in enumerate(names)]
    (root / "llava_med_train.jsonl").write_text("\n".join(lines) + "\n")
    return read_llava_med(root)


def _jsonl(root: Path, names: list[str]) -> Iterator:
    lines = [json.dumps({"question": qa(i)[0], "answer": qa(i)[1], "image": n}) for i, n in enumerate(names)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return read_jsonl(root)


def _parquet(root: Path, names: list[str]) -> Iterator:
    table = pa.table(
        {"question": [qa(i)[0] for i in range(len(names))], "answer": ["yes"] * len(names), "image": names}
    )
    pq.write_table(table, root / "train-00000.parquet")
    return read_parquet(root)


def _pathvqa(root: Path, names: list[str]) -> Iterator:
    images = [{"bytes": None, "path": n} for n in names]  # an HF Image struct that carries only a path
    table = pa.table(
        {"image": images, "question": [qa(i)[0] for i in range(len(names))], "answer": ["no"] * len(names)}
    )
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return read_pathvqa(root / "data")  # the folder of the release's parquet files


# (format, the folder its image names are relative to, the writer)
FORMATS: dict[str, tuple[str, Callable[[Path, list[str]], Iterator]]] = {
    "vqa_rad": (OSF_IMAGES, _osf),
    "vqa_rad_mevf": ("images", _mevf),
    "slake": ("img", _slake),
    "llava_med": (".", _llava_med),
    "llava_med (jsonl)": (".", _llava_med_jsonl),
    "jsonl": (".", _jsonl),
    "parquet": (".", _parquet),
    "pathvqa": ("data", _pathvqa),
}


def test_every_reader_format_is_covered():
    assert {name.split(" ")[0] for name in FORMATS} == set(READERS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_image_paths_outside_the_dataset_are_rejected_with_a_reason(tmp_path: Path, fmt: str) -> None:
    sub, write = FORMATS[fmt]
    root = tmp_path / "dataset"
    images = root / sub
    images.mkdir(parents=True, exist_ok=True)
    (images / "inside.png").write_bytes(png())
    (images / "nested").mkdir()
    (images / "nested" / "deep.png").write_bytes(png())
    secret = tmp_path / "outside.png"  # next to the dataset: what ../outside.png reaches
    secret.write_bytes(png())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "scan.png").write_bytes(png())
    (images / "link.png").symlink_to(secret)  # a symlink inside that points out
    (images / "nested" / "up.png").symlink_to(images / "inside.png")  # one that stays in: fine
    escape = "../" * (len(images.relative_to(tmp_path).parts)) + "outside.png"
    names = ["inside.png", "nested/deep.png", "nested/../inside.png", "nested/up.png",
             escape, "../outside.png", str(elsewhere / "scan.png"), "link.png", "nested/../../" + escape]  # fmt: skip
    rows = list(write(root, names))
    kept = [r for r in rows if not isinstance(r, Reject)]
    rejected = [r for r in rows if isinstance(r, Reject)]
    assert len(kept) == 4, [r.detail for r in rejected]
    assert all(r.reason == IMAGE_OUTSIDE_ROOT for r in rejected) and len(rejected) == 5, rejected
    assert all("outside the dataset root" in r.detail for r in rejected)
    for row in kept:
        assert row["image"].is_relative_to(images.resolve()), row["image"]
        assert validate_sample(row, max_image_pixels=10_000, max_image_bytes=1 << 20, seen_ids=set()) is None
    assert any(str(elsewhere / "scan.png") in r.detail for r in rejected), "the absolute path is named"


def test_an_image_dir_given_explicitly_is_the_root(tmp_path: Path) -> None:
    images = tmp_path / "pictures"
    images.mkdir()
    (images / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png())
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"question": "q?", "answer": "no", "image": n}) for n in ("a.png", "../b.png")]
    (data / "x.jsonl").write_text("\n".join(lines) + "\n")
    rows = list(read_jsonl(data, image_dir=images))
    assert not isinstance(rows[0], Reject) and rows[0]["image"] == (images / "a.png").resolve()
    assert isinstance(rows[1], Reject) and rows[1].reason == IMAGE_OUTSIDE_ROOT


def test_an_unresolvable_image_path_is_a_bad_value_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "loop").symlink_to(tmp_path / "img" / "loop")
    rows = list(_slake(tmp_path, ["bad\x00name.png", "loop"]))
    assert all(isinstance(r, Reject) for r in rows), rows
    assert rows[0].reason == "bad_value" and "bad\\x00name.png" in rows[0].detail
    assert rows[1].reason in {"bad_value", IMAGE_OUTSIDE_ROOT}
