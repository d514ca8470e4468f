"""Task builders: examples decode back to the right boxes/captions, stage-1 extras, streaming splits, resume, and
every bad-data case skipped and counted (never a crash)."""
import gc
import io
import math

import pytest
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from PIL import Image

from granvit.train.data.schema import shard_relpath, write_dataset_card, write_shard, Manifest
from granvit.train.data.synth import SynthConfig, generate_record, write_synth
from granvit.train.data.tasks import ImageQueries, SkipCounter, StreamedImageQueries, TaskBuilder, TaskCollator
from granvit.train.data.tasks import skip_counter_callback

CFG = SynthConfig(image_size=96, min_objects=2, max_objects=4, ocr_fraction=0.25, duplicate_prob=0.5)


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gran"))
    write_synth(out, {"train": 16}, CFG, seed=0, shard_bytes=20_000, shard_multiple=4)
    return out


def label_text(processor, batch, i):
    labels = batch["labels"][i]
    return processor.tokenizer.decode(labels[labels != -100], skip_special_tokens=False)


def test_targets_decode_back_to_the_record(processor):
    records = [generate_record(CFG, 0, "train", i) for i in range(6)]
    builder = TaskBuilder(processor, regions_per_image=3)
    examples = list(builder.iter_examples(records))
    assert {e["task"] for e in examples} == {"bbox2caption", "caption2bbox"}
    batch = TaskCollator(processor)(examples)
    eos = processor.tokenizer.eos_token
    bins = processor.num_coord_bins
    by_id = {r["image_id"]: r for r in records}
    for i, ex in enumerate(examples):
        rec, size = by_id[ex["image_id"]], tuple(ex["image_size"])
        answer = label_text(processor, batch, i)
        assert answer.endswith(eos)
        answer = answer[: -len(eos)]
        if ex["task"] == "caption2bbox":
            decoded = processor.decode_boxes(answer, size)
            caption = next(r["caption"] for r in rec["regions"] if r["bbox"] == ex["boxes"][0])
            truth = sorted((r["bbox"] for r in rec["regions"] if r["caption"] == caption), key=lambda b: (b[1], b[0]))
            assert len(decoded) == len(truth)  # multi-box: every region sharing the caption
            for got, want in zip(decoded, truth):
                for g, w, full in zip(got, want, (size[0], size[1]) * 2):
                    assert abs(g - w) <= full / bins  # within one bin
        else:
            (box,) = ex["boxes"]
            assert processor.encode_box(box, size) in ex["prompt"]
            assert answer in [r["caption"] for r in rec["regions"] if r["bbox"] == box]


def test_multi_box_targets_and_ambiguity(processor):
    rec = generate_record(CFG, 0, "train", 0)
    rec["regions"] = [
        {"bbox": [50.0, 10.0, 80.0, 40.0], "caption": "red circle", "kind": 0},
        {"bbox": [5.0, 10.0, 30.0, 40.0], "caption": "red circle", "kind": 0},
        {"bbox": [5.0, 50.0, 30.0, 90.0], "caption": "blue square", "kind": 0},
    ]
    builder = TaskBuilder(processor, tasks=("caption2bbox",), regions_per_image=3)
    out = {e["prompt"]: e for e in builder.iter_examples([rec])}
    assert len(out) == 2
    multi = next(e for p, e in out.items() if "red circle" in p)
    assert multi["boxes"] == [[5.0, 10.0, 30.0, 40.0], [50.0, 10.0, 80.0, 40.0]]  # reading order
    assert multi["target"] == processor.encode_boxes(multi["boxes"], (96, 96))

    single = TaskBuilder(processor, tasks=("caption2bbox",), regions_per_image=3, multi_box=False)
    examples = list(single.iter_examples([rec]))
    assert [e["boxes"] for e in examples] == [[[5.0, 50.0, 30.0, 90.0]]]
    counter = SkipCounter()
    counter.absorb(examples)
    assert counter.as_dict() == {"ambiguous_caption": 1}


def test_stage1_model_boxes_and_crops(processor):
    rec = generate_record(CFG, 0, "train", 1)
    rec["regions"][0]["bbox"] = [10.2, 20.7, 10.6, 60.0]  # a sub-pixel sliver still gets a 1 px wide crop
    builder = TaskBuilder(processor, tasks=("bbox2caption",), regions_per_image=10, stage1=True)
    examples = list(builder.iter_examples([rec]))
    assert len(examples) == len(rec["regions"])
    image = Image.open(io.BytesIO(rec["image"]["bytes"])).convert("RGB")
    for ex in examples:
        (box,) = ex["boxes"]
        expected = processor.image_processor.to_model_space([box], image.size).tolist()
        assert ex["model_boxes"] == expected
        assert all(0 <= v <= 1 for v in ex["model_boxes"][0])
        (crop,) = ex["crops"]
        x1, y1 = math.floor(box[0]), math.floor(box[1])
        assert crop.size == (max(math.ceil(box[2]), x1 + 1) - x1, max(math.ceil(box[3]), y1 + 1) - y1)
        assert crop.getpixel((0, 0)) == image.getpixel((x1, y1))
    batch = TaskCollator(processor)(examples)
    assert batch["crop_pixel_values"].shape[0] == len(examples)
    assert [b.shape for b in batch["region_boxes"]] == [(1, 4)] * len(examples)


def test_negatives_ask_for_an_absent_caption_and_answer_not_found(synth_dir, processor):
    """caption2bbox_negative: a caption of the dataset that no region of the image has -> "not found" (+ eos)."""
    split = load_dataset(synth_dir, split="train")
    builder = TaskBuilder(processor, tasks={"caption2bbox": 1.0, "caption2bbox_negative": 1.0}, regions_per_image=2)
    items = ImageQueries(split, builder)
    assert set(builder.caption_pool) == {r["caption"] for row in split for r in row["regions"]}
    negatives = [e for i in range(len(items)) for e in items[i] if e["task"] == "caption2bbox_negative"]
    assert len(negatives) == len(split)  # share 1.0: one per image
    captions = {row["image_id"]: {r["caption"] for r in row["regions"]} for row in split}
    for example in negatives:
        asked = example["prompt"][example["prompt"].index("\ue000") + 1 : example["prompt"].index("\ue001")]
        assert asked in builder.caption_pool and asked not in captions[example["image_id"]]
        assert example["prompt"] == processor.caption2bbox_prompt(asked) and example["boxes"] == []
    batch = TaskCollator(processor)(negatives[:3])
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels == processor.not_found_ids + [processor.tokenizer.eos_token_id]
    # seeded by the image: the same negatives again, and a small share gives a few
    again = ImageQueries(split, TaskBuilder(processor, tasks={"caption2bbox": 1.0, "caption2bbox_negative": 1.0},
                                            regions_per_image=2))
    assert [e["prompt"] for i in range(len(again)) for e in again[i] if e["task"] == "caption2bbox_negative"] == [
        e["prompt"] for e in negatives]
    few = ImageQueries(split, TaskBuilder(processor, tasks={"caption2bbox": 1.0, "caption2bbox_negative": 0.25}))
    assert 0 < sum(e["task"] == "caption2bbox_negative" for i in range(len(few)) for e in few[i]) < len(split)


def test_negatives_while_streaming_and_their_limits(synth_dir, processor):
    builder = TaskBuilder(processor, tasks={"caption2bbox_negative": 1.0})
    stream = load_dataset(synth_dir, split="train", streaming=True)
    items = list(StreamedImageQueries(stream, builder))
    assert items and all(e["task"] == "caption2bbox_negative" for item in items for e in item)
    counter = SkipCounter()
    counter.absorb([e for item in items for e in item])
    assert counter.as_dict().get("no_absent_caption", 0) <= 1  # only the first image has nothing absent to ask
    del stream, items
    gc.collect()
    with pytest.raises(ValueError, match="stage 1"):
        TaskBuilder(processor, tasks={"bbox2caption": 1.0, "caption2bbox_negative": 0.1}, stage1=True)


def test_streaming_split_by_node(synth_dir, processor):
    full = load_dataset(synth_dir, split="train", streaming=True)
    assert full.num_shards == 4
    seen = []
    for rank in range(2):
        part = split_dataset_by_node(full, rank=rank, world_size=2)
        assert part.num_shards == 2  # whole shards per rank, no every-rank-reads-everything fallback
        ids = [e["image_id"] for e in TaskBuilder(processor, tasks=("bbox2caption",), regions_per_image=1).apply(part)]
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"synth-0-train-{i:08d}" for i in range(16))


def test_resume_from_state_dict(synth_dir, processor):
    def stream():
        ds = load_dataset(synth_dir, split="train", streaming=True)
        return TaskBuilder(processor, regions_per_image=2).apply(ds, batch_size=4)

    key = lambda e: (e["image_id"], e["task"], e["prompt"])  # noqa: E731
    reference = [key(e) for e in stream()]
    first = stream()
    it = iter(first)
    head = [key(next(it)) for _ in range(13)]
    state = first.state_dict()
    del it  # a partly consumed stream left alive can abort the interpreter at exit (ecosystem.md §1)
    gc.collect()
    resumed = stream()
    resumed.load_state_dict(state)
    tail = [key(e) for e in resumed]
    assert head + tail == reference


def bad_rows() -> tuple[list[dict], dict]:
    """Rows that fit the schema (so they can sit in a shard) but are broken, and the reasons they must be counted under."""
    good = lambda i: generate_record(CFG, 0, "train", i)  # noqa: E731
    rows, expected = [], {}

    def add(row, *reasons):
        rows.append(row)
        for reason in reasons:
            expected[reason] = expected.get(reason, 0) + 1

    r = good(100)
    r["image"] = {"bytes": b"\x89PNG garbage", "path": None}
    add(r, "corrupt_image")
    r = good(101)
    r["image"] = {"bytes": r["image"]["bytes"][:300], "path": None}  # truncated JPEG
    add(r, "corrupt_image")
    r = good(102)
    r["image"] = {"bytes": None, "path": "/nonexistent/img.jpg"}
    add(r, "missing_image")
    r = good(103)
    r["width"] = 97
    add(r, "size_mismatch")
    r = good(104)
    r["regions"] = []
    add(r, "no_regions")
    # region-level problems: the row survives through its other regions
    for reason, change in [
        ("box_nan", {"bbox": [math.nan, 1.0, 20.0, 20.0]}),
        ("box_outside", {"bbox": [1.0, 1.0, 500.0, 20.0]}),
        ("box_inverted", {"bbox": [30.0, 1.0, 20.0, 20.0]}),
        ("box_zero_area", {"bbox": [5.0, 1.0, 5.0, 20.0]}),
        ("empty_caption", {"caption": " "}),
        ("huge_caption", {"caption": "word " * 1000}),
    ]:
        r = good(110 + len(rows))
        r["regions"] = [{**r["regions"][0], **change}] + r["regions"]
        add(r, reason)
    r = good(130)  # every region broken: its region is counted, then the row as no_regions
    r["regions"] = [{**r["regions"][0], "bbox": [1.0, 1.0, 1.0, 1.0]}]
    add(r, "box_zero_area", "no_regions")
    return rows, expected


def test_every_bad_case_is_skipped_and_counted_while_streaming(tmp_path, processor):
    rows, expected = bad_rows()
    good = [generate_record(CFG, 0, "train", i) for i in range(3)]
    out = str(tmp_path)
    manifest = Manifest(out)
    manifest.add(write_shard(out, shard_relpath("train", 0, 1), "train", good[:1] + rows + good[1:]))
    write_dataset_card(out)
    ds = load_dataset(out, split="train", streaming=True)
    counter = SkipCounter()
    collate = TaskCollator(processor, counter)
    examples = list(TaskBuilder(processor, regions_per_image=50).apply(ds))
    for start in range(0, len(examples), 8):
        collate(examples[start : start + 8])
    assert counter.as_dict() == expected
    assert {e["image_id"] for e in examples} >= {r["image_id"] for r in good}


def test_wrong_types_and_oversized_images_are_counted(processor, monkeypatch):
    good = generate_record(CFG, 0, "train", 0)
    records = [
        "not a record",
        {**good, "width": "96"},
        {**good, "image_id": 5},
        {**good, "regions": "a red circle"},
        {**good, "image": None},
        {**good, "regions": [{"bbox": [1, 2, 3], "caption": "x"}, {"bbox": [1, 2, 30, 40], "caption": None}] + good["regions"]},
        good,
    ]
    builder = TaskBuilder(processor, regions_per_image=1)
    counter = SkipCounter()
    counter.absorb(builder.iter_examples(records))
    assert counter.as_dict() == {"wrong_type": 4 + 2, "missing_image": 1}  # 4 rows, 2 regions of a kept row
    monkeypatch.setattr(processor.image_processor, "max_image_pixels", 95 * 95)
    assert list(builder.iter_examples([good])) == [] and builder.pending == {"image_too_large": 1}


def test_trainer_callback_logs_the_counter():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    counter = SkipCounter()
    counter.add("corrupt_image", 2)
    callback = skip_counter_callback(counter)
    state = TrainerState()
    state.log_history.append({"loss": 1.0, "step": 3})
    logs = {"loss": 1.0}
    callback.on_log(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), logs=logs)
    assert logs["data/skipped_corrupt_image"] == 2
    assert state.log_history[-1]["data/skipped_corrupt_image"] == 2
