"""Gran shard format: round trips (streaming and not), the card, shard planning, atomic writes + resume, the validator."""
import gc
import io
import json
import math
import multiprocessing
import os
import signal

import pytest
from datasets import Image as ImageFeature
from datasets import load_dataset
from PIL import Image

from granvit.train.data.schema import (
    GRAN_FEATURES,
    Manifest,
    plan_num_shards,
    validate_record,
    write_dataset_card,
    write_split,
)
from granvit.train.data.synth import SynthConfig, generate_record, write_synth


def jpeg_bytes(size=(64, 48), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def record(**overrides) -> dict:
    rec = {
        "image": {"bytes": jpeg_bytes(), "path": None},
        "image_id": "img-0",
        "width": 64,
        "height": 48,
        "source": "test",
        "kind": "natural",
        "regions": [{"bbox": [1.0, 2.0, 30.0, 40.0], "caption": "a red thing", "kind": "natural"}],
    }
    rec.update(overrides)
    return rec


def region(**overrides) -> dict:
    reg = {"bbox": [1.0, 2.0, 30.0, 40.0], "caption": "a red thing", "kind": "natural"}
    reg.update(overrides)
    return reg


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gran"))
    write_synth(out, {"train": 12, "val": 4}, SynthConfig(image_size=96), seed=3, shard_bytes=30_000, shard_multiple=2)
    return out


def test_round_trip_streaming_and_not(synth_dir):
    expected = [generate_record(SynthConfig(image_size=96), 3, "train", i) for i in range(12)]
    ds = load_dataset(synth_dir, split="train")
    assert ds.features == GRAN_FEATURES
    assert len(ds) == 12
    ids = load_dataset(synth_dir, split="train", streaming=True)
    assert ids.features == GRAN_FEATURES
    streamed = list(ids)  # consumed fully: a half-read stream can abort the interpreter at exit (ecosystem.md §1)
    by_id = {r["image_id"]: r for r in expected}
    for row in (ds[i] for i in range(len(ds))), streamed:
        rows = list(row)
        assert sorted(r["image_id"] for r in rows) == sorted(by_id)
        for r in rows:
            want = by_id[r["image_id"]]
            assert r["image"].size == (want["width"], want["height"])
            assert [x["caption"] for x in r["regions"]] == [x["caption"] for x in want["regions"]]
            for got, exp in zip(r["regions"], want["regions"]):
                assert got["bbox"] == pytest.approx(exp["bbox"])
                assert GRAN_FEATURES["regions"].feature["kind"].int2str(got["kind"]) == exp["kind"]
    raw = load_dataset(synth_dir, split="val").cast_column("image", ImageFeature(decode=False))
    assert raw[0]["image"]["bytes"][:2] == b"\xff\xd8"  # the JPEG bytes are stored as produced, not re-encoded


def test_card_and_layout(synth_dir):
    card = open(os.path.join(synth_dir, "README.md"), encoding="utf-8").read()
    assert "configs:" in card and "dataset_info:" in card and "path: data/train-*.parquet" in card
    assert "num_examples: 12" in card and "class_label" in card
    files = sorted(os.listdir(os.path.join(synth_dir, "data")))
    train = [f for f in files if f.startswith("train-")]
    assert len(train) % 2 == 0 and train[0].endswith(f"-of-{len(train):05d}.parquet")
    manifest = json.load(open(os.path.join(synth_dir, "manifest.json")))
    assert sum(s["rows"] for s in manifest["shards"].values() if s["split"] == "train") == 12
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"].values())


@pytest.mark.parametrize(
    "total, items, shard_bytes, multiple, expected",
    [
        (10, 100, 100, 1, 1),  # tiny: one shard
        (1000, 100, 100, 1, 10),
        (1000, 100, 100, 8, 16),  # rounded up to the multiple
        (1000, 12, 100, 8, 8),  # more shards than items: the largest multiple <= items
        (1000, 5, 100, 8, 5),  # fewer items than the multiple: one item per shard
    ],
)
def test_plan_num_shards(total, items, shard_bytes, multiple, expected):
    assert plan_num_shards(total, items, shard_bytes, multiple) == expected


class CrashingProducer:
    """Synthetic records; at item `crash_at` it SIGKILLs its own process (no cleanup code can run)."""

    def __init__(self, crash_at=None):
        self.crash_at = crash_at

    def __call__(self, start, stop, counts):
        for i in range(start, stop):
            if i == self.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield generate_record(SynthConfig(image_size=64), 0, "train", i)

    def plan(self):
        return {"source": "crash-test"}


def _run(out, producer):
    # row groups of 2 rows: the killed shard has really written bytes to its temp file before dying
    write_split(out, "train", producer, num_items=20, total_bytes=4000, shard_bytes=1000, row_group_size=2)


def test_killed_run_leaves_no_partial_shard_and_resumes(tmp_path):
    out = str(tmp_path)
    proc = multiprocessing.get_context("fork").Process(target=_run, args=(out, CrashingProducer(crash_at=13)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    data = os.path.join(out, "data")
    visible = sorted(f for f in os.listdir(data) if not f.startswith("."))
    assert visible == [f"train-0000{i}-of-00004.parquet" for i in range(2)]  # item 13 is in shard 2 (items 10-14)
    assert any(f.startswith(".train-00002") for f in os.listdir(data))  # its temp file is there, but hidden
    done_mtime = os.path.getmtime(os.path.join(data, visible[0]))

    _run(out, CrashingProducer())  # resume
    assert sorted(os.listdir(data)) == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    assert os.path.getmtime(os.path.join(data, visible[0])) == done_mtime  # finished shards are not redone
    write_dataset_card(out)
    ds = load_dataset(out, split="train")
    assert sorted(ds["image_id"]) == sorted(f"synth-0-train-{i:08d}" for i in range(20))
    assert all(Manifest(out).done(f"data/{f}", verify=True) for f in os.listdir(data))


def test_resume_refuses_a_different_plan(tmp_path):
    out = str(tmp_path)
    write_split(out, "train", CrashingProducer(), num_items=20, total_bytes=4000, shard_bytes=1000)
    with pytest.raises(ValueError, match="was started with plan"):
        write_split(out, "train", CrashingProducer(), num_items=20, total_bytes=4000, shard_bytes=500)


def truncated_jpeg() -> bytes:
    data = jpeg_bytes((256, 256))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "rec, reason",
    [
        (record(), None),
        (record(image={"bytes": b"not an image at all", "path": None}), "corrupt_image"),
        (record(image={"bytes": truncated_jpeg(), "path": None}, width=256, height=256), "corrupt_image"),
        (record(image={"bytes": None, "path": "/nonexistent/x.jpg"}), "missing_image"),
        (record(image=None), "missing_image"),
        (record(width=100), "size_mismatch"),
        (record(regions=[]), "no_regions"),
        (record(regions=[region(bbox=[math.nan, 2, 30, 40])]), "box_nan"),
        (record(regions=[region(bbox=[1, 2, math.inf, 40])]), "box_nan"),
        (record(regions=[region(bbox=[1, 2, 65, 40])]), "box_outside"),
        (record(regions=[region(bbox=[-1, 2, 30, 40])]), "box_outside"),
        (record(regions=[region(bbox=[30, 2, 1, 40])]), "box_inverted"),
        (record(regions=[region(bbox=[1, 2, 1, 40])]), "box_zero_area"),
        (record(regions=[region(caption="   ")]), "empty_caption"),
        (record(regions=[region(caption="x" * 5000)]), "huge_caption"),
        (record(regions=[region(caption=7)]), "wrong_type"),
        (record(regions=[region(bbox=[1, 2, 30])]), "wrong_type"),
        (record(regions=[region(bbox="1,2,3,4")]), "wrong_type"),
        (record(width="64"), "wrong_type"),
        (record(image_id=None), "wrong_type"),
        ("not a dict", "wrong_type"),
    ],
)
def test_validate_record_reasons(rec, reason):
    assert validate_record(rec) == reason


def test_validate_loaded_rows(synth_dir):
    ds = load_dataset(synth_dir, split="train")
    assert [validate_record(ds[i]) for i in range(len(ds))] == [None] * len(ds)
    del ds
    gc.collect()
