"""data.annotation_noise (train/data/noise.py): what a detector + captioner's errors do to the training regions."""
from collections import Counter

import pytest
from datasets import Dataset, Features, List, Value, ClassLabel
from granvit.console import UserError
from granvit.train.data.noise import AnnotationNoise, add_annotation_noise, corrupt_regions, scaled_filters

REGION = {"bbox": List(Value("float32"), length=4), "caption": Value("string"), "kind": ClassLabel(names=["natural", "ocr"])}
FEATURES = Features({"image_id": Value("string"), "width": Value("int32"), "height": Value("int32"), "regions": List(REGION)})
ROWS = [{"image_id": str(i), "width": 128, "height": 128,
         "regions": [{"bbox": [10.0, 10.0, 60.0, 60.0], "caption": f"red shape {i}", "kind": 0},
                     {"bbox": [70.0, 70.0, 120.0, 120.0], "caption": f"blue shape {i}", "kind": 0}]} for i in range(20)]


def split():
    return Dataset.from_list(ROWS, features=FEATURES)


def test_no_noise_is_the_identity():
    noisy, counts = add_annotation_noise(split(), AnnotationNoise())
    assert noisy["regions"] == split()["regions"] and counts["images_dropped"] == 0


def test_every_region_missed_drops_every_image():
    noisy, counts = add_annotation_noise(split(), AnnotationNoise(miss=1.0))
    assert len(noisy) == 0 and counts == {"missed": 40, "regions_before": 40, "regions_after": 0, "images_dropped": 20}


def test_wrong_captions_come_from_the_split_and_differ():
    noisy, counts = add_annotation_noise(split(), AnnotationNoise(wrong_caption=1.0))
    captions = {r["caption"] for row in ROWS for r in row["regions"]}
    for before, after in zip(ROWS, noisy):
        for a, b in zip(before["regions"], after["regions"]):
            assert b["caption"] != a["caption"] and b["caption"] in captions and b["bbox"] == a["bbox"]
    assert counts["wrong_caption"] == 40


def test_jitter_moves_boxes_inside_the_image_and_is_seeded():
    noise = AnnotationNoise(jitter=0.5, seed=3)
    first, again = add_annotation_noise(split(), noise)[0], add_annotation_noise(split(), noise)[0]
    assert first["regions"] == again["regions"]  # a pure function of (seed, index)
    assert first["regions"] != add_annotation_noise(split(), AnnotationNoise(jitter=0.5, seed=4))[0]["regions"]
    boxes = [r["bbox"] for row in first for r in row["regions"]]
    assert all(0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 128 for x1, y1, x2, y2 in boxes)
    assert sum(b != [10.0, 10.0, 60.0, 60.0] and b != [70.0, 70.0, 120.0, 120.0] for b in boxes) == 40


def test_spurious_regions_and_the_engine_filters():
    counts = Counter()
    # the paper's 100 x 100 px area rule at 448 px is 28.6 x 28.6 px at 128 px
    assert scaled_filters(128, 128).min_box_area == pytest.approx(100 * 100 * (128 / 448) ** 2)
    row = {**ROWS[0], "regions": ROWS[0]["regions"] + [{"bbox": [0.0, 0.0, 20.0, 20.0], "caption": "tiny", "kind": 0},
                                                        {"bbox": [0.0, 0.0, 100.0, 20.0], "caption": "flat", "kind": 0}]}
    kept = corrupt_regions(row, 0, AnnotationNoise(filters=True), ["x"], counts)
    assert [r["caption"] for r in kept] == ["red shape 0", "blue shape 0"]
    assert counts == {"filtered_box_area": 1, "filtered_box_aspect": 1}
    noisy, counts = add_annotation_noise(split(), AnnotationNoise(spurious=2.0))
    assert counts["spurious"] == counts["regions_after"] - 40 > 20  # ~2 per image on 20 images


def test_recipe_section_is_checked():
    assert AnnotationNoise.from_recipe(None) is None and AnnotationNoise.from_recipe({}) is None
    assert AnnotationNoise.from_recipe({"miss": 0.1}).miss == 0.1
    with pytest.raises(UserError, match="unknown key"):
        AnnotationNoise.from_recipe({"mis": 0.1})
    with pytest.raises(UserError, match="probability"):
        AnnotationNoise.from_recipe({"miss": 1.5})
