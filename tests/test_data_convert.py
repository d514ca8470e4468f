"""Converters on tiny fixtures written here: every format, every filter counted, broken inputs counted, parallel,
resume, and the granvit-data CLI (synth / convert / validate)."""
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image

from granvit.train.data.cli import main, parse_size
from granvit.train.data.convert import FilterConfig, convert
from granvit.train.data.schema import shard_relpath, write_dataset_card, write_shard, Manifest


def save_jpeg(path, size=(640, 480), colour=(120, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=80)
    return path


def captions_by_image(out):
    ds = load_dataset(out, split="train")
    return {r["image_id"]: sorted(x["caption"] for x in r["regions"]) for r in ds}


def test_coco_detection_and_captions(tmp_path):
    images = tmp_path / "imgs"
    save_jpeg(str(images / "a.jpg"))
    save_jpeg(str(images / "b.jpg"), (500, 460))
    save_jpeg(str(images / "small.jpg"), (400, 300))  # short side <= 448: filtered
    instances = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "b.jpg", "width": 500, "height": 460},
            {"id": 3, "file_name": "small.jpg", "width": 400, "height": 300},
            {"id": 4, "file_name": "gone.jpg", "width": 640, "height": 480},  # missing file: broken
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 8, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 200, 150], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 8, "bbox": [300, 100, 120, 200.5], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 8, "bbox": [0, 0, 400, 400], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [10, 10, 50, 50], "iscrowd": 0},  # area 2500: filtered
            {"id": 5, "image_id": 3, "category_id": 7, "bbox": [10, 10, 200, 200], "iscrowd": 0},
            {"id": 6, "image_id": 4, "category_id": 7, "bbox": [10, 10, 200, 200], "iscrowd": 0},
        ],
    }
    captions = {"images": instances["images"][:1], "annotations": [{"id": 9, "image_id": 1, "caption": "a dog and a man"}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = str(tmp_path / "out")
    counts = convert("coco", [str(tmp_path / "instances.json"), str(tmp_path / "captions.json")], out, str(images))
    assert counts["written"] == 1
    assert counts["filtered"] == {"crowd": 1, "box_area": 1, "min_regions": 1, "image_short_side": 1}
    assert counts["broken"] == {"missing_image": 1}
    assert counts["regions"] == {"written": 3}
    assert captions_by_image(out) == {"coco-1": ["a dog and a man", "dog", "person"]}
    ds = load_dataset(out, split="train")
    boxes = {r["caption"]: r["bbox"] for r in ds[0]["regions"]}
    assert boxes["dog"] == [10, 10, 210, 160]  # xywh -> xyxy
    assert boxes["a dog and a man"] == [0, 0, 640, 480]
    assert json.load(open(os.path.join(out, "counts-train.json")))["written"] == 1


def test_refcoco_json_parquet_and_no_pickle(tmp_path):
    images = tmp_path / "imgs"
    save_jpeg(str(images / "COCO_1.jpg"))
    instances = {"images": [{"id": 1, "file_name": "COCO_1.jpg", "width": 640, "height": 480}],
                 "annotations": [{"id": 11, "image_id": 1, "bbox": [100, 50, 200, 300], "category_id": 1}]}
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train", "sentences": [{"sent": "man on the left"}, {"raw": "Left man"}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "val only"}]},
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = str(tmp_path / "json")
    convert("refcoco", [str(tmp_path / "refs.json")], out, str(images), instances=str(tmp_path / "instances.json"), ref_split="train")
    assert captions_by_image(out) == {"refcoco-1": ["Left man", "man on the left"]}

    image_bytes = open(images / "COCO_1.jpg", "rb").read()
    table = pa.table({
        "image_id": [1, 1],
        "image": [{"bytes": image_bytes, "path": "COCO_1.jpg"}] * 2,
        "bbox": [[100.0, 50.0, 200.0, 300.0], [300.0, 100.0, 150.0, 200.0]],
        "answer": [["the man"], ["the woman", "lady"]],
    })
    pq.write_table(table, tmp_path / "refs.parquet")
    out = str(tmp_path / "parquet")
    convert("refcoco", [str(tmp_path / "refs.parquet")], out)
    ds = load_dataset(out, split="train")
    assert sorted((r["caption"], tuple(r["bbox"])) for r in ds[0]["regions"]) == [
        ("lady", (300, 100, 450, 300)), ("the man", (100, 50, 300, 350)), ("the woman", (300, 100, 450, 300)),
    ]
    (tmp_path / "refs(unc).p").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="unpickle"):
        convert("refcoco", [str(tmp_path / "refs(unc).p")], str(tmp_path / "p"))


def test_visual_genome(tmp_path):
    save_jpeg(str(tmp_path / "VG_100K_2" / "5.jpg"), (800, 600))
    regions = [{"id": 5, "regions": [
        {"region_id": 1, "image_id": 5, "x": 10, "y": 20, "width": 300, "height": 200, "phrase": "a red kite"},
        {"region_id": 2, "image_id": 5, "x": 10, "y": 20, "width": 400, "height": 20, "phrase": "a thin wire"},  # aspect 20
    ]}]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
    out = str(tmp_path / "out")
    counts = convert("vg", [str(tmp_path / "region_descriptions.json")], out, str(tmp_path))
    assert counts["filtered"] == {"box_aspect": 1}
    assert captions_by_image(out) == {"vg-5": ["a red kite"]}


def test_ocr_paddle_and_textocr(tmp_path):
    save_jpeg(str(tmp_path / "img" / "p1.jpg"), (700, 500))
    words = [
        {"transcription": "OPEN", "points": [[10, 10], [210, 12], [210, 120], [10, 118]]},
        {"transcription": "###", "points": [[300, 10], [500, 10], [500, 200], [300, 200]]},
    ]
    (tmp_path / "label.txt").write_text(f"img/p1.jpg\t{json.dumps(words)}\n")
    out = str(tmp_path / "paddle")
    counts = convert("ocr", [str(tmp_path / "label.txt")], out, str(tmp_path))
    assert counts["filtered"] == {"illegible": 1}
    ds = load_dataset(out, split="train")
    assert ds[0]["kind"] == 1 and ds[0]["regions"] == [{"bbox": [10, 10, 210, 120], "caption": "OPEN", "kind": 1}]

    textocr = {
        "imgs": {"t1": {"id": "t1", "file_name": "img/p1.jpg", "width": 700, "height": 500}},
        "anns": {
            "t1_1": {"id": "t1_1", "image_id": "t1", "bbox": [20, 30, 150, 110], "utf8_string": "EXIT"},
            "t1_2": {"id": "t1_2", "image_id": "t1", "bbox": [300, 30, 150, 110], "utf8_string": "."},
        },
    }
    (tmp_path / "textocr.json").write_text(json.dumps(textocr))
    out = str(tmp_path / "textocr")
    counts = convert("ocr", [str(tmp_path / "textocr.json")], out, str(tmp_path))
    assert counts["filtered"] == {"illegible": 1}
    assert captions_by_image(out) == {"ocr-t1": ["EXIT"]}


def write_jsonl(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def filter_fixture(tmp_path):
    """One image (or region) caught by each filter rule, plus one clean image."""
    save_jpeg(str(tmp_path / "ok.jpg"), (600, 500))
    save_jpeg(str(tmp_path / "short.jpg"), (600, 440))
    save_jpeg(str(tmp_path / "wide.jpg"), (1600, 500))
    box = {"bbox": [10, 10, 210, 210], "caption": "a box"}
    return write_jsonl(tmp_path, [
        {"image": "ok.jpg", "image_id": "ok", "regions": [
            box,
            {"bbox": [10, 10, 50, 50], "caption": "tiny"},  # box_area
            {"bbox": [10, 10, 410, 110], "caption": "long"},  # box_aspect 4
        ]},
        {"image": "short.jpg", "image_id": "short", "regions": [box]},  # image_short_side
        {"image": "wide.jpg", "image_id": "wide", "regions": [box]},  # image_aspect 3.2
        {"image": "ok.jpg", "image_id": "empty", "regions": []},  # min_regions
    ])


@pytest.mark.parametrize(
    "disabled, passes",
    [
        (None, set()),
        ("min_short_side", {"short"}),
        ("max_aspect", {"wide", "long"}),
        ("min_box_area", {"tiny"}),
    ],
)
def test_every_filter_is_counted_and_configurable(tmp_path, disabled, passes):
    path = filter_fixture(tmp_path)
    filters = FilterConfig(**({disabled: 0} if disabled else {}))
    counts = convert("jsonl", [path], str(tmp_path / "out"), str(tmp_path), filters=filters)
    expected = {"image_short_side": 1, "image_aspect": 1, "box_area": 1, "box_aspect": 1, "min_regions": 1}
    if disabled == "min_short_side":
        del expected["image_short_side"]
    if disabled == "max_aspect":
        del expected["image_aspect"], expected["box_aspect"]
    if disabled == "min_box_area":
        del expected["box_area"]
    assert counts["filtered"] == expected
    got = captions_by_image(str(tmp_path / "out"))
    assert set(got) == {"ok"} | ({"short"} & passes) | ({"wide"} & passes)
    assert set(got["ok"]) == {"a box"} | ({"tiny", "long"} & passes)


def test_broken_inputs_are_counted_by_reason(tmp_path):
    save_jpeg(str(tmp_path / "ok.jpg"), (600, 500))
    (tmp_path / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    full = open(tmp_path / "ok.jpg", "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": its boxes could be in either frame
    Image.new("RGB", (600, 500)).save(tmp_path / "rotated.jpg", exif=exif)
    good = {"bbox": [10, 10, 210, 210], "caption": "fine"}
    path = write_jsonl(tmp_path, [
        {"image": "ok.jpg", "image_id": "a", "regions": [
            good,
            {"bbox": [math.nan, 10, 210, 210], "caption": "nan"},
            {"bbox": [10, 10, 900, 210], "caption": "outside"},
            {"bbox": [210, 10, 10, 210], "caption": "inverted"},
            {"bbox": [10, 10, 10, 210], "caption": "zero"},
            {"bbox": [10, 10, 210, 210], "caption": ""},
            {"bbox": [10, 10, 210, 210], "caption": "x" * 2000},
            {"bbox": [10, 10, 210], "caption": "three numbers"},
            {"bbox": [10, 10, 210, 210], "caption": 42},
            {"bbox": [-0.5, 10, 600.5, 210], "caption": "rounded outward by annotators: clipped, kept"},
        ]},
        {"image": "corrupt.jpg", "image_id": "b", "regions": [good]},
        {"image": "truncated.jpg", "image_id": "c", "regions": [good]},
        {"image": "missing.jpg", "image_id": "d", "regions": [good]},
        {"image": "rotated.jpg", "image_id": "r", "regions": [good]},
        {"image": "ok.jpg", "image_id": "e", "width": 640, "height": 480, "regions": [good]},
    ])
    counts = convert("jsonl", [path], str(tmp_path / "out"), str(tmp_path))
    assert counts["broken"] == {
        "box_nan": 1, "box_outside": 1, "box_inverted": 1, "box_zero_area": 1, "empty_caption": 1,
        "huge_caption": 1, "wrong_type": 2, "corrupt_image": 2, "missing_image": 1, "size_mismatch": 1,
        "exif_orientation": 1,
    }
    ds = load_dataset(str(tmp_path / "out"), split="train")
    assert [r["caption"] for r in ds[0]["regions"]] == ["fine", "rounded outward by annotators: clipped, kept"]
    assert ds[0]["regions"][1]["bbox"] == [0, 10, 600, 210]


def test_parallel_matches_serial_and_rerun_resumes(tmp_path):
    rows = []
    for i in range(8):
        save_jpeg(str(tmp_path / f"{i}.jpg"), (500 + i, 480), colour=(i * 20, 50, 50))
        rows.append({"image": f"{i}.jpg", "image_id": f"img{i}", "regions": [{"bbox": [0, 0, 200 + i, 200], "caption": f"c{i}"}]})
    path = write_jsonl(tmp_path, rows)
    kwargs = dict(images_dir=str(tmp_path), shard_bytes=4000, shard_multiple=2)
    serial = convert("jsonl", [path], str(tmp_path / "serial"), **kwargs)
    parallel = convert("jsonl", [path], str(tmp_path / "parallel"), num_proc=2, **kwargs)
    assert serial == parallel and serial["written"] == 8
    a, b = Manifest(str(tmp_path / "serial")), Manifest(str(tmp_path / "parallel"))
    assert len(a.shards()) % 2 == 0
    assert [s["sha256"] for s in a.shards()] == [s["sha256"] for s in b.shards()]  # same bytes, whatever the workers
    before = {s["path"]: os.path.getmtime(tmp_path / "serial" / s["path"]) for s in a.shards()}
    assert convert("jsonl", [path], str(tmp_path / "serial"), **kwargs) == serial  # nothing left to do
    assert before == {s["path"]: os.path.getmtime(tmp_path / "serial" / s["path"]) for s in a.shards()}


def test_cli_synth_convert_validate(tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert main(["synth", out, "--train", "6", "--val", "2", "--test", "0", "--image-size", "64", "--shard-size", "8KB",
                 "--shard-multiple", "2", "--no-duplicates", "--textures", "solid"]) == 0
    assert len(load_dataset(out, split="train")) == 6
    capsys.readouterr()
    assert main(["validate", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": 8, "ok": 8, "broken": {}, "checksum_mismatch": [], "unreadable_files": [],
                                                      "empty_splits": []}

    tiny = str(tmp_path / "tiny")
    assert main(["synth", tiny, "--preset", "tiny", "--train", "3", "--val", "0", "--test", "0", "--max-objects", "2"]) == 0
    config = json.load(open(os.path.join(tiny, "manifest.json")))["plans"]["train"]["config"]
    assert (config["image_size"], config["max_objects"], config["textures"]) == (128, 2, ["solid"])  # preset + override

    path = filter_fixture(tmp_path)
    conv = str(tmp_path / "conv")
    assert main(["convert", "--from", "jsonl", conv, "--inputs", path, "--images", str(tmp_path), "--min-box-area", "0"]) == 0
    printed = capsys.readouterr().out
    assert '"box_area"' not in printed and '"image_short_side": 1' in printed


def test_validate_counts_bad_rows_by_reason(tmp_path, capsys):
    from granvit.train.data.synth import SynthConfig, generate_record

    good = [generate_record(SynthConfig(image_size=64), 0, "train", i) for i in range(3)]
    bad = [dict(good[0], image={"bytes": b"junk", "path": None}), dict(good[1], width=65), dict(good[2], regions=[])]
    bad.append(dict(good[0], regions=[{"bbox": [5.0, 5.0, 1.0, 9.0], "caption": "x", "kind": 0}]))
    out = str(tmp_path)
    Manifest(out).add(write_shard(out, shard_relpath("train", 0, 1), "train", good + bad))
    write_dataset_card(out)
    assert main(["validate", out]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report == {"rows": 7, "ok": 3, "broken": {"box_inverted": 1, "corrupt_image": 1, "no_regions": 1, "size_mismatch": 1},
                      "checksum_mismatch": [], "unreadable_files": [], "empty_splits": []}
    with open(os.path.join(out, shard_relpath("train", 0, 1)), "r+b") as f:  # flip bytes: the checksum notices
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert main(["validate", out, "--no-decode"]) == 1
    assert json.loads(capsys.readouterr().out)["checksum_mismatch"] == [shard_relpath("train", 0, 1)]


def test_parse_size():
    assert parse_size("500MB") == 500 * 2**20
    assert parse_size("0.5GB") == 2**29
    assert parse_size("8kb") == 8192
    assert parse_size("1234") == 1234
