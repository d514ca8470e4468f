"""Benchmark registry: local files in the Hub schema become canonical samples; bad rows are named."""
import json

import pytest
from PIL import Image

from granvit.eval.benchmarks import BENCHMARKS, FAMILIES, TASK_TYPES, get_benchmark, iter_samples, load_rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def image_path(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    return "a.png"


def test_registry_is_consistent():
    for b in BENCHMARKS.values():
        assert b.family in FAMILIES and b.task_type in TASK_TYPES, b.name
        assert "/" in b.hub_id and b.split, b.name
    assert {b.family for b in BENCHMARKS.values()} == set(FAMILIES)


def test_refcoco_rows_explode_and_convert_xywh(tmp_path, image_path):
    rows = [{"question_id": 7, "image": image_path, "answer": ["left man", "man on left"], "bbox": [2, 3, 10, 5]}]
    bench = get_benchmark("refcoco_val")
    ds = load_rows(bench, _write_jsonl(tmp_path / "r.jsonl", rows))
    samples = list(iter_samples(bench, ds, base_dir=str(tmp_path)))
    assert [s["expression"] for s in samples] == ["left man", "man on left"]
    assert samples[0]["box"] == [2.0, 3.0, 12.0, 8.0]
    assert samples[0]["image"].size == (40, 30) and samples[0]["id"] == "7#0"


def test_mmbench_rotations_share_a_circular_group(tmp_path, image_path):
    # The rotated copy of question 1 has index 1 + 1e6; D is empty and not offered.
    rows = [{"index": 1, "image": image_path, "question": "Colour?", "hint": None, "A": "red", "B": "blue",
             "C": "green", "D": None, "answer": "A"},
            {"index": 1000001, "image": image_path, "question": "Colour?", "hint": "Look.", "A": "blue",
             "B": "green", "C": "red", "D": None, "answer": "C"}]
    bench = get_benchmark("mmbench_en_dev")
    samples = list(iter_samples(bench, load_rows(bench, _write_jsonl(tmp_path / "m.jsonl", rows)), str(tmp_path)))
    assert [s["group"] for s in samples] == ["1", "1"]
    assert all(s["options"][s["answer"]] == "red" and set(s["options"]) == {"A", "B", "C"} for s in samples)
    assert samples[1]["question"] == "Look.\nColour?"


def test_missing_field_names_field_and_row(tmp_path, image_path):
    rows = [{"questionId": 1, "image": image_path, "question": "q", "answers": ["a"]},
            {"questionId": 2, "image": image_path, "question": "q"}]
    bench = get_benchmark("docvqa_val")
    with pytest.raises(ValueError, match=r"row 1 has no field 'answers'"):
        list(iter_samples(bench, load_rows(bench, _write_jsonl(tmp_path / "d.jsonl", rows)), str(tmp_path)))


def test_parquet_with_embedded_images(tmp_path):
    import io

    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    feats = Features({"image": HFImage(), "question": Value("string"), "answer": Value("string"),
                      "type": Value("string")})
    Dataset.from_list([{"image": {"bytes": buf.getvalue(), "path": None}, "question": "max?", "answer": "12",
                        "type": "human_test"}], features=feats).to_parquet(str(tmp_path / "c.parquet"))
    bench = get_benchmark("chartqa")
    (s,) = iter_samples(bench, load_rows(bench, str(tmp_path / "c.parquet")))
    assert s["answers"] == ["12"] and s["image"].size == (8, 8) and s["subset"] == "human_test"


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("nope")
