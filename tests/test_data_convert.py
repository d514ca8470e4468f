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


def test_refcoco_json_and_parquet(tmp_path):
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


# RefCOCO as the `refer` toolkit ships it (refcoco/refs(unc).p + refcoco/instances.json): its refs, field for field.
OFFICIAL_REFS = [
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000001_11.jpg", "ann_id": 11, "ref_id": 0, "image_id": 1,
     "split": "train", "category_id": 1, "sentences": [
         {"tokens": ["man", "on", "the", "left"], "raw": "Man on the left.", "sent_id": 0, "sent": "man on the left"},
         {"tokens": ["left", "guy"], "raw": "left guy", "sent_id": 1, "sent": "left guy"}]},
    {"sent_ids": [2], "file_name": "COCO_train2014_000000000001_12.jpg", "ann_id": 12, "ref_id": 1, "image_id": 1,
     "split": "testA", "category_id": 1, "sentences": [
         {"tokens": ["woman", "in", "red"], "raw": "woman in red", "sent_id": 2, "sent": "woman in red"}]},
    {"sent_ids": [3], "file_name": "COCO_train2014_000000000002_21.jpg", "ann_id": 21, "ref_id": 2, "image_id": 2,
     "split": "train", "category_id": 18, "sentences": [
         {"tokens": ["caf\u00e9", "dog"], "raw": "caf\u00e9 dog", "sent_id": 3, "sent": "caf\u00e9 dog"}]},
]


def python2_pickle(obj) -> bytes:
    """`obj` (lists, dicts, str, int) as Python 2's `pickle.dump(refs, f)` writes it (protocol 0: str as UTF-8 byte
    strings, opcode S), which is how refs(unc).p was made. Python 3's pickler cannot write Python 2 strings."""
    def dump(o) -> bytes:
        if isinstance(o, bool) or o is None:
            raise TypeError(o)
        if isinstance(o, int):
            return b"I%d\n" % o
        if isinstance(o, str):
            return b"S'" + o.encode("utf-8").replace(b"\\", b"\\\\").replace(b"'", b"\\'") + b"'\n"
        if isinstance(o, list):
            return b"(l" + b"".join(dump(v) + b"a" for v in o)
        if isinstance(o, dict):
            return b"(d" + b"".join(dump(k) + dump(v) + b"s" for k, v in o.items())
        raise TypeError(o)

    return dump(obj) + b"."


def refcoco_files(tmp_path):
    images = tmp_path / "train2014"
    save_jpeg(str(images / "COCO_train2014_000000000001.jpg"))
    save_jpeg(str(images / "COCO_train2014_000000000002.jpg"), (500, 460))
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 500, "height": 460}],
        "annotations": [{"id": 11, "image_id": 1, "bbox": [100, 50, 200, 300], "category_id": 1},
                        {"id": 12, "image_id": 1, "bbox": [350, 40, 180, 400], "category_id": 1},
                        {"id": 21, "image_id": 2, "bbox": [20, 30, 300, 250], "category_id": 18}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return images, str(tmp_path / "instances.json")


def rows(out):
    return sorted(load_dataset(out, split="train").to_list(), key=lambda r: r["image_id"])


@pytest.mark.parametrize("split", [None, "train"])
def test_refcoco_pickle_converts_exactly_like_its_json_twin(tmp_path, split):
    import pickle

    images, instances = refcoco_files(tmp_path)
    (tmp_path / "refs.json").write_text(json.dumps(OFFICIAL_REFS))
    (tmp_path / "refs(unc).p").write_bytes(python2_pickle(OFFICIAL_REFS))
    (tmp_path / "refs(umd).pkl").write_bytes(pickle.dumps(OFFICIAL_REFS, protocol=pickle.HIGHEST_PROTOCOL))
    outs = {}
    for name in ("refs.json", "refs(unc).p", "refs(umd).pkl"):
        outs[name] = str(tmp_path / "out" / name.replace("(", "_").replace(")", "_"))
        convert("refcoco", [str(tmp_path / name)], outs[name], str(images), instances=instances, ref_split=split)
    assert rows(outs["refs(unc).p"]) == rows(outs["refs.json"]) == rows(outs["refs(umd).pkl"])
    expected = {"refcoco-1": ["left guy", "man on the left"] + (["woman in red"] if split is None else []),
                "refcoco-2": ["caf\u00e9 dog"]}
    assert captions_by_image(outs["refs(unc).p"]) == expected
    # one command, as a user runs it
    assert main(["convert", "--from", "refcoco", str(tmp_path / "cli"), "--inputs", str(tmp_path / "refs(unc).p"),
                 "--instances", instances, "--images", str(images), *(["--ref-split", split] if split else [])]) == 0
    assert rows(str(tmp_path / "cli")) == rows(outs["refs.json"])


class Payload:
    """Unpickling this calls `function(*args)`: what a malicious refs(unc).p would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("payload", ["os.system", "exec", "nested"])
def test_refcoco_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, payload, capsys):
    import builtins
    import pickle

    images, instances = refcoco_files(tmp_path)
    marker = tmp_path / "ran"
    if payload == "os.system":
        evil = Payload(os.system, f"touch '{marker}'")
    elif payload == "exec":
        evil = Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')")
    else:  # valid refs first, the call hidden in the last sentence
        evil = [*OFFICIAL_REFS[:2], dict(OFFICIAL_REFS[2], sentences=[Payload(builtins.exec, f"open({str(marker)!r}, 'w')")])]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match="refused to unpickle: it would load the Python object .*nothing in the file was run"):
        convert("refcoco", [str(path)], str(tmp_path / "out"), str(images), instances=instances)
    assert not marker.exists()
    assert main(["convert", "--from", "refcoco", str(tmp_path / "out"), "--inputs", str(path), "--instances", instances,
                 "--images", str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to unpickle" in err[0] and "refs(unc).p" in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()  # refused before any output was started
    (tmp_path / "broken.p").write_bytes(pickle.dumps(OFFICIAL_REFS)[:40])
    with pytest.raises(ValueError, match="not a readable pickle"):
        convert("refcoco", [str(tmp_path / "broken.p")], str(tmp_path / "out2"), str(images), instances=instances)


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


def test_textocr_wide_words_kept_with_default_filters(tmp_path):
    """TextOCR's layout with the default flags: a 200 x 40 px word (aspect 5, area 8000) and a small one are kept, as
    text regions; the paper's box rules are for natural regions (the same box as a natural region is dropped), and a
    text rule is there when asked for. The data card says which rules were applied."""
    save_jpeg(str(tmp_path / "train_images" / "a1.jpg"), (1024, 768))
    textocr = {
        "imgs": {"a1": {"id": "a1", "width": 1024, "height": 768, "set": "train", "file_name": "train/a1.jpg"}},
        "anns": {
            "a1_1": {"id": "a1_1", "image_id": "a1", "bbox": [100.0, 200.0, 200.0, 40.0], "utf8_string": "PHARMACY",
                     "points": [100.0, 200.0, 300.0, 200.0, 300.0, 240.0, 100.0, 240.0], "area": 8000.0},
            "a1_2": {"id": "a1_2", "image_id": "a1", "bbox": [320.0, 210.0, 30.0, 14.0], "utf8_string": "24h",
                     "points": [320.0, 210.0, 350.0, 210.0, 350.0, 224.0, 320.0, 224.0], "area": 420.0},
            "a1_3": {"id": "a1_3", "image_id": "a1", "bbox": [400.0, 210.0, 30.0, 14.0], "utf8_string": ".",
                     "points": [400.0, 210.0, 430.0, 210.0, 430.0, 224.0, 400.0, 224.0], "area": 420.0},
        },
        "imgToAnns": {"a1": ["a1_1", "a1_2", "a1_3"]},
    }
    (tmp_path / "TextOCR_0.1_train.json").write_text(json.dumps(textocr))  # "train/a1.jpg" found as train_images/a1.jpg
    out = str(tmp_path / "out")
    assert main(["convert", "--from", "ocr", out, "--inputs", str(tmp_path / "TextOCR_0.1_train.json"),
                 "--images", str(tmp_path / "train_images")]) == 0
    ds = load_dataset(out, split="train")
    assert ds[0]["kind"] == 1 and [(r["caption"], r["bbox"], r["kind"]) for r in ds[0]["regions"]] == [
        ("PHARMACY", [100, 200, 300, 240], 1), ("24h", [320, 210, 350, 224], 1)]
    card = open(os.path.join(out, "README.md")).read()
    assert "natural regions with aspect ratio in [1/3, 3] and area > 10000 px^2" in card
    assert "text (OCR) regions kept whatever their shape and size" in card

    counts = convert("ocr", [str(tmp_path / "TextOCR_0.1_train.json")], str(tmp_path / "strict"),
                     str(tmp_path / "train_images"), filters=FilterConfig(text_min_box_area=1000))
    assert counts["filtered"] == {"illegible": 1, "text_box_area": 1}
    natural = write_jsonl(tmp_path, [{"image": "a1.jpg", "regions": [{"bbox": [100, 200, 300, 240], "caption": "x"},
                                                                           {"bbox": [100, 200, 300, 240], "caption": "PHARMACY", "kind": "ocr"}]}])
    counts = convert("jsonl", [natural], str(tmp_path / "mixed"), str(tmp_path / "train_images"))
    assert counts["filtered"] == {"box_aspect": 1} and counts["regions"] == {"written": 1}


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
