"""Readers: the real VQA-RAD / SLAKE samples (quirks kept), and PathVQA, LLaVA-Med, parquet, JSONL on files
written here. See docs/DATA.md for the mapping each test checks."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hscr_platform.data.readers import READERS, ColumnMap, SourceConfig, read_source
from hscr_platform.data.readers.llava_med import read_llava_med
from hscr_platform.data.readers.pathvqa import read_pathvqa
from hscr_platform.data.readers.slake import read_slake
from hscr_platform.data.readers.tabular import read_jsonl, read_parquet
from hscr_platform.data.readers.vqa_rad import read_vqa_rad, read_vqa_rad_mevf
from hscr_platform.data.samples import Reject

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_samples"
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real samples not found at {REAL} (expected ../shared/data/real_samples)"
)
OSF_IMAGES = REAL / "vqa_rad" / "osf" / "VQA_RAD Image Folder"


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def by_id(rows: list) -> dict[str, dict]:
    return {row["id"]: row for row in rows}


# --- VQA-RAD (OSF) --------------------------------------------------------------------------------


@needs_real
def test_vqa_rad_osf_reads_every_record_with_its_quirks() -> None:
    rows = list(read_vqa_rad(REAL / "vqa_rad" / "osf"))
    assert len(rows) == 40 and not any(isinstance(r, Reject) for r in rows)
    rows_by_id = by_id(rows)
    assert len(rows_by_id) == 40
    assert "vqa_rad:0" in rows_by_id  # qid is the string "0" in the first record
    assert rows_by_id["vqa_rad:1511"]["answer"] == "4"  # int answers became text
    assert rows_by_id["vqa_rad:2234"]["answer"] == rows_by_id["vqa_rad:2235"]["answer"] == "12"
    assert rows_by_id["vqa_rad:2156"]["answer_type"] == "closed"  # "CLOSED " with a trailing space
    assert rows_by_id["vqa_rad:2156"]["answer"] == "Maybe"
    assert "\ufffd" in rows_by_id["vqa_rad:2136"]["question"]  # U+FFFD kept as it is
    assert collections.Counter(r["answer_type"] for r in rows) == {"closed": 26, "open": 14}
    assert collections.Counter(r["organ"] for r in rows) == {"chest": 15, "head": 13, "abdomen": 12}
    assert collections.Counter(r["split"] for r in rows) == {"train": 33, "test": 7}  # from phrase_type
    assert {"atrib", "prse", "pos, pres", "other"} <= {r["question_type"] for r in rows}
    assert all(r["modality"] is None and r["source"] == "vqa_rad" for r in rows)
    assert all(isinstance(r["image"], Path) and r["image"].is_file() for r in rows)


@needs_real
def test_vqa_rad_osf_meta_keeps_the_record_verbatim() -> None:
    rows = by_id(list(read_vqa_rad(REAL / "vqa_rad" / "osf" / "VQA_RAD Dataset Public.json")))
    meta = json.loads(rows["vqa_rad:1511"]["meta"])
    assert meta["answer"] == 4 and meta["phrase_type"] == "freeform"
    assert json.loads(rows["vqa_rad:1"]["meta"])["question_rephrase"] == "NULL"  # "NULL" strings kept
    assert json.loads(rows["vqa_rad:2157"]["meta"])["answer_type"] == "CLOSED "
    assert json.loads(rows["vqa_rad:0"]["meta"])["qid"] == "0"


@needs_real
def test_vqa_rad_split_override() -> None:
    rows = list(read_vqa_rad(REAL / "vqa_rad" / "osf", split="validation"))
    assert {r["split"] for r in rows} == {"validation"}


# --- VQA-RAD (MEVF) -------------------------------------------------------------------------------


@needs_real
def test_vqa_rad_mevf_reads_both_files_with_split_from_the_name() -> None:
    rows = list(read_vqa_rad_mevf(REAL / "vqa_rad" / "mevf", image_dir=OSF_IMAGES))
    assert len(rows) == 20 and not any(isinstance(r, Reject) for r in rows)
    assert collections.Counter(r["split"] for r in rows) == {"train": 10, "test": 10}
    rows_by_id = by_id(rows)
    assert len(rows_by_id) == 20  # qids are per file: the file is part of the id
    assert rows_by_id["vqa_rad_mevf:trainset:33"]["question"] == "Are there >12 of ribs? "  # verbatim
    assert rows_by_id["vqa_rad_mevf:testset:2581"]["answer"] == "5mm"
    assert rows_by_id["vqa_rad_mevf:testset:595"]["question_type"] == "pos, pres"


@needs_real
def test_vqa_rad_mevf_without_its_image_folder_names_it() -> None:
    with pytest.raises(FileNotFoundError, match="images"):
        read_vqa_rad_mevf(REAL / "vqa_rad" / "mevf")


# --- SLAKE ----------------------------------------------------------------------------------------


@needs_real
def test_slake_reads_the_english_test_records() -> None:
    rows = list(read_slake(REAL / "slake"))
    assert len(rows) == 40 and not any(isinstance(r, Reject) for r in rows)
    assert len(by_id(rows)) == 40
    assert {r["split"] for r in rows} == {"test"}
    assert collections.Counter(r["modality"] for r in rows) == {"ct": 25, "mri": 10, "xray": 5}
    assert collections.Counter(r["answer_type"] for r in rows) == {"open": 27, "closed": 13}
    assert collections.Counter(r["question_type"] for r in rows)["kg"] == 6
    assert {r["organ"] for r in rows} >= {"lung", "brain_tissue", "pelvic cavity"}
    assert all(json.loads(r["meta"])["q_lang"] == "en" for r in rows)
    assert all(r["image"].name == "source.jpg" and r["image"].is_file() for r in rows)


def test_slake_keeps_english_only_and_accepts_imgs_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").write_bytes(jpeg())
    base = {"img_id": 1, "img_name": "xmlab1/source.jpg", "answer": "Yes", "answer_type": "CLOSED"}
    records = [
        {**base, "qid": 1, "question": "Is this a CT?", "q_lang": "en", "modality": "CT"},
        {**base, "qid": 2, "question": "这是CT吗?", "answer": "是", "q_lang": "zh", "modality": "CT"},
        {**base, "qid": 3, "q_lang": "en"},  # no question
    ]
    (tmp_path / "validate.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    rows = list(read_slake(tmp_path))
    assert len(rows) == 2 and rows[0]["id"] == "slake:1"
    assert rows[0]["split"] == "validation" and rows[0]["image"] == tmp_path / "imgs" / "xmlab1" / "source.jpg"
    assert isinstance(rows[1], Reject) and rows[1].id == "slake:3" and rows[1].reason == "missing_field"
    assert "question" in rows[1].detail


# --- PathVQA (Hugging Face parquet) ---------------------------------------------------------------


def test_pathvqa_parquet_with_image_structs(tmp_path: Path) -> None:
    images = [jpeg((10, 10, 10)), jpeg((20, 20, 20)), None]
    table = pa.table(
        {
            "image": [{"bytes": b, "path": f"img{i}.jpg" if b else None} for i, b in enumerate(images)],
            "question": ["Is this a neoplasm?", "What is shown?", "Is it benign?"],
            "answer": ["yes", "granuloma", "no"],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    rows = list(read_pathvqa(tmp_path))
    assert [r["id"] for r in rows] == [f"pathvqa:test-00000-of-00001:{i}" for i in range(3)]
    assert [r["answer_type"] for r in rows] == ["closed", "open", "closed"]
    assert {r["split"] for r in rows} == {"test"} and {r["source"] for r in rows} == {"pathvqa"}
    assert rows[0]["image"] == images[0] and rows[2]["image"] is None  # a null image: missing_image later
    assert json.loads(rows[1]["meta"])["image"] == "img1.jpg"


# --- LLaVA-Med instruct ---------------------------------------------------------------------------


def test_llava_med_one_row_per_question_answer_turn(tmp_path: Path) -> None:
    (tmp_path / "fig1.jpg").write_bytes(jpeg())
    records: list[Any] = [
        {
            "id": "PMC1",
            "image": "fig1.jpg",
            "domain": {
                "chest_xray": False,
                "ct_scan": True,
                "mri": False,
                "histology": False,
                "gross": False,
            },
            "conversations": [
                {"from": "human", "value": "<image>\nWhat does the CT show?"},
                {"from": "gpt", "value": "A mass in the left lobe."},
                {"from": "human", "value": "Is it large?"},
                {"from": "gpt", "value": "Yes"},
            ],
        },
        {"id": "PMC2", "image": "fig2.jpg"},  # no conversations
        "not an object",
    ]
    (tmp_path / "llava_med_instruct_10k.json").write_text(json.dumps(records))
    rows = list(read_llava_med(tmp_path / "llava_med_instruct_10k.json"))
    good = [r for r in rows if not isinstance(r, Reject)]
    assert [r["id"] for r in good] == ["llava_med:PMC1:0", "llava_med:PMC1:1"]
    assert good[0]["question"] == "What does the CT show?" and good[0]["answer"] == "A mass in the left lobe."
    assert [r["answer_type"] for r in good] == ["open", "closed"]
    assert {r["modality"] for r in good} == {"ct"} and good[0]["image"] == tmp_path / "fig1.jpg"
    assert json.loads(good[1]["meta"]) == {
        "id": "PMC1",
        "image": "fig1.jpg",
        "domain": records[0]["domain"],
        "turn": 1,
    }
    assert [(r.id, r.reason) for r in rows if isinstance(r, Reject)] == [
        ("llava_med:PMC2", "missing_field"),
        ("llava_med:llava_med_instruct_10k:2", "bad_json"),
    ]


# --- generic parquet / JSONL ----------------------------------------------------------------------


def test_parquet_with_a_column_mapping_and_image_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg())
    table = pa.table(
        {
            "uid": ["u1", "u2"],
            "q": ["Which organ?", "Any fracture?"],
            "a": ["liver", "No"],
            "img": ["a.jpg", "missing.jpg"],
            "kind": ["OPEN", None],
            "set": ["val", "train"],
            "site": ["Hospital A", "Hospital B"],
        }
    )
    pq.write_table(table, tmp_path / "mine.parquet")
    columns = ColumnMap(question="q", answer="a", image="img", id="uid", answer_type="kind", split="set")
    rows = list(read_parquet(tmp_path / "mine.parquet", columns=columns, name="mine", image_dir=tmp_path / "imgs"))
    assert [r["id"] for r in rows] == ["u1", "u2"]
    assert [r["split"] for r in rows] == ["validation", "train"]
    assert [r["answer_type"] for r in rows] == ["open", "closed"]  # from the column; inferred when null
    assert rows[0]["image"] == tmp_path / "imgs" / "a.jpg" and rows[0]["source"] == "mine"
    assert json.loads(rows[0]["meta"])["site"] == "Hospital A"


def test_parquet_without_a_mapped_column_names_it(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="image"):
        read_parquet(tmp_path)


def test_jsonl_bad_lines_are_rejected_and_good_rows_come_through(tmp_path: Path) -> None:
    lines = [
        json.dumps({"question": "Is it a CT?", "answer": "yes", "image": "a.jpg"}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"question": "Where?", "image": "a.jpg"}),  # no answer
        json.dumps({"question": "How many?", "answer": 3, "image": "a.jpg"}),
        json.dumps({"question": ["a", "list"], "answer": "x", "image": "a.jpg"}),
    ]
    (tmp_path / "train.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"question": "caf\xe9?"}\n')
    rows = list(read_jsonl(tmp_path))
    good = [r for r in rows if not isinstance(r, Reject)]
    assert [(r["id"], r["answer"], r["split"]) for r in good] == [
        ("jsonl:train:1", "yes", "train"),
        ("jsonl:train:6", "3", "train"),
    ]
    rejects = [(r.id, r.reason) for r in rows if isinstance(r, Reject)]
    assert rejects == [
        ("jsonl:train:2", "bad_json"),
        ("jsonl:train:4", "bad_json"),
        ("jsonl:train:5", "missing_field"),
        ("jsonl:train:7", "bad_value"),
        ("jsonl:train:8", "missing_field"),  # invalid UTF-8 became U+FFFD; the line still parses
    ]


# --- registry and missing sources -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_a_missing_source_raises_file_not_found_naming_it(tmp_path: Path, fmt: str) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        read_source(SourceConfig(format=fmt, path=str(missing)))


def test_source_config_is_strict() -> None:
    with pytest.raises(ValueError, match="columns"):
        SourceConfig(format="slake", path="x", columns=ColumnMap(question="q"))
    with pytest.raises(ValueError, match="split"):
        SourceConfig(format="jsonl", path="x", split="dev")
