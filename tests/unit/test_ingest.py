"""Sample validation (every bad-row kind -> its reject reason) and the ingest job end to end."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hscr_platform.core.config import ConfigError, load_config
from hscr_platform.core.io import read_table
from hscr_platform.data.ingest import IngestJobConfig
from hscr_platform.data.samples import ImageError, decode_image, validate_sample
from hscr_platform.data.schema import REJECT_SCHEMA, SAMPLE_SCHEMA, sample_row
from jobs.ingest import main

REPO = Path(__file__).resolve().parents[2]
REAL = REPO.parent / "shared" / "data" / "real_samples"
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real samples not found at {REAL} (expected ../shared/data/real_samples)"
)
TINY = REPO / "jobs" / "configs" / "ingest" / "tiny.yaml"
JSONL = ("source.format=jsonl", "source.columns.id=id")
LIMITS = {"max_image_pixels": 4_000_000, "max_image_bytes": 1 << 20}


def jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    image = Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256 + 1))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def row(**values: Any) -> dict[str, Any]:
    base = {"id": "r1", "source": "test", "split": "train", "image": jpeg(), "question": "Q?", "answer": "A"}
    return sample_row(**{"answer_type": "open", **base, **values})


def reason_of(sample: dict[str, Any], seen: set[str] | None = None) -> str | None:
    reject = validate_sample(sample, seen_ids=set() if seen is None else seen, **LIMITS)
    return None if reject is None else reject.reason


# --- decode_image / validate_sample ---------------------------------------------------------------


def test_decode_image_returns_a_loaded_image() -> None:
    image = decode_image(jpeg((20, 10)), max_pixels=1000)
    assert image.size == (20, 10) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (jpeg()[:300], "truncated_image"),
        (jpeg()[: len(jpeg()) // 2], "truncated_image"),
        (png_header(3000, 3000), "image_too_large"),  # over our limit, refused from the header
        (png_header(50_000, 50_000), "image_too_large"),  # PIL's decompression-bomb guard
        (b"this is not an image at all", "unreadable_image"),
    ],
)
def test_decode_image_refuses_bad_bytes_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=LIMITS["max_image_pixels"])
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({}, None),
        ({"question": None}, "missing_field"),
        ({"question": "  "}, "empty_question"),
        ({"answer": ""}, "empty_answer"),
        ({"image": None}, "missing_image"),
        ({"image": Path("/no/such/image.jpg")}, "missing_image"),
        ({"image": b""}, "empty_image"),
        ({"image": jpeg()[:300]}, "truncated_image"),
        ({"image": png_header(50_000, 50_000)}, "image_too_large"),
        ({"image": b"\0" * (2 << 20)}, "image_too_large"),  # over max_image_bytes
    ],
)
def test_validate_sample_reasons(values: dict[str, Any], reason: str | None) -> None:
    assert reason_of(row(**values)) == reason


def test_validate_sample_reads_a_path_and_rejects_duplicate_ids(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg())
    seen: set[str] = set()
    first = row(image=tmp_path / "a.jpg")
    assert reason_of(first, seen) is None and first["image"] == jpeg() and seen == {"r1"}
    assert reason_of(row(), seen) == "duplicate_id"
    assert reason_of(row(id="r2", answer=""), seen) == "empty_answer" and "r2" not in seen


def test_validate_sample_checks_file_size_before_reading(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(b"\0" * (2 << 20))
    assert reason_of(row(image=tmp_path / "big.jpg")) == "image_too_large"


# --- the ingest job -------------------------------------------------------------------------------


def write_bad_dataset(folder: Path) -> dict[str, str]:
    """A JSONL dataset with every bad-row kind; returns {id: expected reason or "ok"}."""
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg())
    (folder / "truncated.jpg").write_bytes(jpeg()[:300])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "huge.png").write_bytes(png_header(50_000, 50_000))
    records: list[Any] = [
        {"id": "ok1", "question": "Is it a CT?", "answer": "yes", "image": "good.jpg"},
        {"id": "ok2", "question": "How many?", "answer": 2, "image": "good.jpg"},
        {"id": "no_answer", "question": "Where?", "image": "good.jpg"},
        {"id": "truncated", "question": "Q?", "answer": "A", "image": "truncated.jpg"},
        {"id": "empty_bytes", "question": "Q?", "answer": "A", "image": "empty.jpg"},
        {"id": "huge", "question": "Q?", "answer": "A", "image": "huge.png"},
        {"id": "no_file", "question": "Q?", "answer": "A", "image": "absent.jpg"},
        {"id": "blank_q", "question": " ", "answer": "A", "image": "good.jpg"},
        {"id": "blank_a", "question": "Q?", "answer": "", "image": "good.jpg"},
        {"id": "ok1", "question": "Again?", "answer": "no", "image": "good.jpg"},
    ]
    lines = [json.dumps(r) for r in records] + ["{oops"]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "ok1": "ok",
        "ok2": "ok",
        "no_answer": "missing_field",
        "truncated": "truncated_image",
        "empty_bytes": "empty_image",
        "huge": "image_too_large",
        "no_file": "missing_image",
        "blank_q": "empty_question",
        "blank_a": "empty_answer",
    }


def ingest(*overrides: str) -> dict[str, Any]:
    summary: dict[str, Any] = main(["--config", str(TINY), *overrides])
    return summary


def test_ingest_writes_samples_and_rejects_with_reasons(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expected = write_bad_dataset(tmp_path / "src")
    out = tmp_path / "out"
    summary = ingest(*JSONL, f"source.path={tmp_path / 'src'}", f"output.path={out}")
    samples, rejects = read_table(out / "samples"), read_table(out / "rejects")
    assert samples.schema.equals(SAMPLE_SCHEMA) and rejects.schema.equals(REJECT_SCHEMA)
    assert samples.column("id").to_pylist() == ["ok1", "ok2"]
    assert samples.column("answer").to_pylist() == ["yes", "2"]
    got = dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist(), strict=True))
    assert got.pop("jsonl:data:11") == "bad_json"
    assert got.pop("ok1") == "duplicate_id"
    assert got == {k: v for k, v in expected.items() if v != "ok"}
    assert summary["rows_read"] == 11 and summary["samples_written"] == 2 and summary["rejects_written"] == 9
    assert summary["rejects_by_reason"]["bad_json"] == 1
    assert json.loads((out / "summary.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert "rows read        11" in printed and "truncated_image" in printed


@needs_real
@pytest.mark.parametrize(
    ("fmt", "path", "extra"),
    [
        ("vqa_rad", "vqa_rad/osf", []),
        (
            "vqa_rad_mevf",
            "vqa_rad/mevf",
            ["source.image_dir=" + str(REAL / "vqa_rad/osf/VQA_RAD Image Folder")],
        ),
        ("slake", "slake", []),
    ],
)
def test_ingest_real_samples_keeps_every_row(tmp_path: Path, fmt: str, path: str, extra: list[str]) -> None:
    summary = ingest(f"source.format={fmt}", f"source.path={REAL / path}", f"output.path={tmp_path}", *extra)
    expected = 20 if fmt == "vqa_rad_mevf" else 40
    assert (summary["rows_read"], summary["samples_written"], summary["rejects_written"]) == (
        expected,
        expected,
        0,
    )
    assert read_table(tmp_path / "samples").num_rows == expected
    assert read_table(tmp_path / "rejects").num_rows == 0  # an empty but readable dataset


def test_ingest_refuses_a_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    write_bad_dataset(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's file")
    args = [*JSONL, f"source.path={tmp_path / 'src'}", f"output.path={out}"]
    with pytest.raises(SystemExit) as caught:
        ingest(*args)
    assert caught.value.code == 2 and not (out / "samples").exists()
    ingest(*args, "output.overwrite=true")
    ingest(*args, "output.overwrite=true", "output.rows_per_shard=1")
    assert len(list((out / "samples").glob("part-*.parquet"))) == 2  # the old shard was replaced
    assert read_table(out / "samples").num_rows == 2 and (out / "keep.txt").read_text() == "someone else's file"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_ingest_refuses_to_write_inside_the_source(tmp_path: Path) -> None:
    write_bad_dataset(tmp_path / "src")
    with pytest.raises(SystemExit):
        ingest(*JSONL, f"source.path={tmp_path / 'src'}", f"output.path={tmp_path / 'src' / 'o'}")
    assert not (tmp_path / "src" / "o").exists()


def test_job_exit_codes_in_a_subprocess(tmp_path: Path) -> None:
    write_bad_dataset(tmp_path / "src")
    command = [sys.executable, "-m", "jobs.ingest", "--config", str(TINY), *JSONL]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run(
        [*command, f"source.path={tmp_path / 'src'}", f"output.path={tmp_path / 'out'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "samples written  2" in ok.stdout and "rejects written  9" in ok.stdout
    missing = tmp_path / "no_such_source"
    failed = subprocess.run(
        [*command, f"source.path={missing}", f"output.path={tmp_path / 'out2'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert failed.returncode == 2 and str(missing) in failed.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "base.yaml"])
def test_configs_load(name: str) -> None:
    cfg = load_config(IngestJobConfig, TINY.parent / name)
    assert cfg.output.rows_per_shard >= 1


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"source\.colour"):
        load_config(IngestJobConfig, TINY, ["source.colour=red"])
    with pytest.raises(ConfigError, match="format"):
        load_config(IngestJobConfig, TINY, ["source.format=dicom"])
    with pytest.raises(ConfigError, match="columns"):
        load_config(IngestJobConfig, TINY, ["source.columns.question=q"])  # vqa_rad has no column mapping
    cfg = load_config(IngestJobConfig, TINY, ["source.format=parquet", "source.columns.question=q"])
    assert cfg.source.columns.question == "q"


def test_ingest_vqa_rad_folder_windows_16_bit_scans_and_rejects_paths_outside(tmp_path: Path) -> None:
    """A new user's VQA-RAD-format folder: a 16-bit scan is kept with its contrast, escapes are rejected."""
    import numpy as np

    src = tmp_path / "vqa_rad"
    images = src / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))  # (16, 256)
    Image.fromarray(ramp).save(images / "scan16.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "outside.png")
    (images / "escape.png").symlink_to(tmp_path / "outside.png")
    names = ["scan16.png", "../../outside.png", str(tmp_path / "outside.png"), "escape.png"]
    records = [{"qid": i, "question": "Is it normal?", "answer": "yes", "image_name": n} for i, n in enumerate(names)]
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    summary = ingest("source.format=vqa_rad", f"source.path={src}", f"output.path={out}")
    assert (summary["samples_written"], summary["rejects_written"]) == (1, 3)
    assert summary["rejects_by_reason"] == {"image_outside_root": 3} and summary["images_windowed"] == 1
    sample = read_table(out / "samples").to_pylist()[0]
    image = Image.open(io.BytesIO(sample["image"]))
    values = np.asarray(image)
    assert image.mode == "L" and len(np.unique(values)) == 256 and values.mean() == pytest.approx(127.5, abs=0.01)
    assert json.loads(sample["meta"])["image_8bit"]["window"] == [0.0, 65535.0]
    details = read_table(out / "rejects").column("detail").to_pylist()
    assert all("outside the dataset root" in d for d in details), details


def test_ingest_lists_every_missing_input_before_touching_the_output(tmp_path: Path) -> None:
    from hscr_platform.core.preflight import PreflightError
    from hscr_platform.data.ingest import run

    cfg = load_config(
        IngestJobConfig,
        TINY,
        ["source.format=vqa_rad", f"source.path={tmp_path / 'no-data'}", f"source.image_dir={tmp_path / 'no-img'}",
         f"output.path={tmp_path / 'out'}"],
    )  # fmt: skip
    with pytest.raises(PreflightError) as caught:
        run(cfg)
    assert [p.what for p in caught.value.problems] == ["source.path", "source.image_dir"]
    assert f"source {tmp_path / 'no-data'} does not exist" in str(caught.value)
    assert not (tmp_path / "out").exists()
