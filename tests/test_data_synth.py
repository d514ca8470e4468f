"""The synthetic Gran set: deterministic, valid, configurable, captions that pick out one region."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from granvit.train.data.schema import validate_record
from granvit.train.data.synth import COLOURS, PRESETS, SynthConfig, _relation_holds, generate_record, write_synth


def test_deterministic_by_seed_and_split():
    cfg = SynthConfig(image_size=96)
    assert generate_record(cfg, 0, "train", 5) == generate_record(cfg, 0, "train", 5)
    others = [generate_record(cfg, 1, "train", 5), generate_record(cfg, 0, "val", 5), generate_record(cfg, 0, "train", 6)]
    assert all(o["image"]["bytes"] != generate_record(cfg, 0, "train", 5)["image"]["bytes"] for o in others)


def test_records_are_valid_and_mixed():
    cfg = SynthConfig(image_size=128, ocr_fraction=0.3)
    records = [generate_record(cfg, 0, "train", i) for i in range(60)]
    assert [validate_record(r) for r in records] == [None] * 60
    kinds = {r["kind"] for r in records}
    assert kinds == {"natural", "ocr"}
    for r in records:
        assert all(reg["kind"] == r["kind"] for reg in r["regions"])


def test_object_pixels_match_their_caption_colour():
    """The box centre of a solid object has the colour its caption names (boxes and captions describe the image)."""
    cfg = SynthConfig(image_size=128, textures=("solid",), shapes=("square", "circle"), ocr_fraction=0, max_overlap=0)
    for i in range(20):
        rec = generate_record(cfg, 0, "train", i)
        img = np.asarray(Image.open(io.BytesIO(rec["image"]["bytes"])).convert("RGB")).astype(int)
        for reg in rec["regions"]:
            x1, y1, x2, y2 = reg["bbox"]
            centre = img[int((y1 + y2) / 2), int((x1 + x2) / 2)]
            named = next(w for w in reg["caption"].split() if w in COLOURS)  # the target's own colour comes first
            nearest = min(COLOURS, key=lambda c: np.abs(np.asarray(COLOURS[c]) - centre).sum())
            assert nearest == named, (reg, centre)


def test_tiny_preset_parameters_are_respected():
    cfg = SynthConfig(**PRESETS["tiny"])
    assert (cfg.image_size, cfg.min_objects, cfg.max_objects, cfg.object_size) == (128, 1, 3, (0.25, 0.6))
    for i in range(40):
        rec = generate_record(cfg, 0, "train", i)
        assert (rec["width"], rec["height"]) == (128, 128)
        assert 1 <= len(rec["regions"]) <= 3
        captions = [r["caption"] for r in rec["regions"]]
        assert len(set(captions)) == len(captions)  # distinct objects: every caption is unique in its image
        for reg in rec["regions"]:
            x1, y1, x2, y2 = reg["bbox"]
            assert 0.25 * 128 - 2 <= max(x2 - x1, y2 - y1) <= 0.6 * 128
            assert len(reg["caption"].split()) == 3  # "<size> <colour> <shape>": no texture word, no relation


def test_duplicates_get_relational_captions_that_hold():
    # one shape, one colour, one size: every object is a twin, so captions must use relations or positions
    cfg = SynthConfig(
        image_size=160, min_objects=3, max_objects=3, object_size=(0.15, 0.2), num_sizes=1, shapes=("triangle", "circle"),
        colours=("red",), textures=("solid",), ocr_fraction=0, max_overlap=0,
    )
    relational = 0
    for i in range(30):
        rec = generate_record(cfg, 0, "train", i)
        boxes = {r["caption"]: [] for r in rec["regions"]}
        for r in rec["regions"]:
            boxes[r["caption"]].append(r["bbox"])
        for r in rec["regions"]:
            cap = r["caption"]
            for rel in ("left of", "right of", "above", "below"):
                if f" {rel} the " in cap:
                    relational += 1
                    ref = [x for x in rec["regions"] if x["caption"] == cap.split(f" {rel} the ")[1]]
                    assert len(ref) == 1 and _relation_holds(rel, r["bbox"], ref[0]["bbox"])
                    assert len(boxes[cap]) == 1  # the relation made it unique
    assert relational > 5


def test_no_relations_means_shared_captions():
    cfg = SynthConfig(image_size=128, min_objects=3, max_objects=3, num_sizes=1, shapes=("circle",), colours=("blue",),
                      textures=("solid",), relations=False, ocr_fraction=0, max_overlap=0.5)
    rec = generate_record(cfg, 0, "train", 0)
    assert {r["caption"] for r in rec["regions"]} == {"blue circle"}


def test_ocr_pages_have_word_and_line_boxes():
    cfg = SynthConfig(image_size=256, ocr_fraction=1.0)
    rec = generate_record(cfg, 0, "train", 0)
    assert rec["kind"] == "ocr" and validate_record(rec) is None
    words = [r for r in rec["regions"] if " " not in r["caption"]]
    lines = [r for r in rec["regions"] if " " in r["caption"]]
    assert words and lines
    for line in lines:  # each line box is the union of its word boxes, in order
        inside = [w for w in words if all(line["bbox"][k] <= w["bbox"][k] for k in (0, 1)) and all(w["bbox"][k] <= line["bbox"][k] for k in (2, 3))]
        assert " ".join(w["caption"] for w in inside).startswith(line["caption"].split()[0])
    img = np.asarray(Image.open(io.BytesIO(rec["image"]["bytes"])).convert("L")).astype(int)
    x1, y1, x2, y2 = (int(v) for v in words[0]["bbox"])
    assert img[y1:y2, x1:x2].min() < img.mean() - 60  # dark ink inside the word box


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="num_sizes"):
        SynthConfig(num_sizes=4)
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig(shapes=("blob",))
    with pytest.raises(ValueError, match="distinct objects"):
        SynthConfig(shapes=("circle",), colours=("red",), textures=("solid",), num_sizes=1, allow_duplicates=False)


def test_write_synth_splits_parallel(tmp_path):
    counts = write_synth(str(tmp_path), {"train": 16, "val": 4, "test": 4}, SynthConfig(image_size=64), seed=0,
                         num_proc=2, shard_bytes=10_000, shard_multiple=4)
    assert {s: c["written"] for s, c in counts.items()} == {"train": 16, "val": 4, "test": 4}
    files = os.listdir(tmp_path / "data")
    assert sum(f.startswith("train-") for f in files) % 4 == 0
    assert {f.split("-")[0] for f in files} == {"train", "val", "test"}


def test_write_synth_rerun_resumes(tmp_path):
    args = (str(tmp_path), {"train": 6}, SynthConfig(**PRESETS["tiny"]))
    first = write_synth(*args, shard_bytes=5_000)
    data = tmp_path / "data"
    mtimes = {f: os.path.getmtime(data / f) for f in os.listdir(data)}
    assert write_synth(*args, shard_bytes=5_000) == first  # the stored plan (JSON) equals the config again
    assert mtimes == {f: os.path.getmtime(data / f) for f in os.listdir(data)}
