"""Synthetic downstream benchmarks: answers checked against the scene graph they were asked about, prompts in both box
formats, training examples, the scorer's extremes, and the written dataset (splits, loading, validation)."""
import hashlib
import io
import re

import pytest
from datasets import load_dataset
from PIL import Image

from granvit.eval.benchmarks import FAMILIES
from granvit.eval.downstream import evaluate_downstream, score_predictions
from granvit.train.data.downstream import (
    BENCHMARKS, LETTERS, METRICS, OPPOSITE, check_row, downstream_prompt, downstream_target, generate_row,
    make_question, name, write_downstream,
)
from granvit.train.data.synth import _captions, _describe, _gap, _relation_holds
from granvit.train.data.tasks import SkipCounter, TaskBuilder, TaskCollator
from conftest import load_tiny

SIZE = 128
N = 12  # questions per benchmark checked against their scene


def questions(benchmark, n=N, split="test"):
    return [(make_question(benchmark, 0, split, i, SIZE), generate_row(benchmark, 0, split, i, SIZE)) for i in range(n)]


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def named(objects, text):
    """The one object whose shortest name is `text` (the names are unique by construction)."""
    (obj,) = [o for o in objects if name(o, objects) == text]
    return obj


# ----------------------------------------------------------------------------------------------- rows
def test_rows_are_pure_valid_and_labelled():
    for benchmark, bench in BENCHMARKS.items():
        row = generate_row(benchmark, 0, "train", 3, SIZE)
        assert row == generate_row(benchmark, 0, "train", 3, SIZE)
        assert row["image"]["bytes"] != generate_row(benchmark, 0, "train", 4, SIZE)["image"]["bytes"]
        assert check_row(row) is None, benchmark
        assert (row["benchmark"], row["family"], row["metric"]) == (benchmark, bench.family, bench.metric)
        assert row["family"] in FAMILIES and row["metric"] in METRICS
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (row["width"], row["height"]) == (SIZE, SIZE)
    assert {b.family for b in BENCHMARKS.values()} == set(FAMILIES)


def test_count_equals_the_objects_counted():
    seen = set()
    for (_, _, scene), row in questions("synth_count", 30):
        objects, q = scene["objects"], row["question"]
        if q == "How many objects are there?":
            want = len(objects)
        elif m := re.fullmatch(r"How many (\w+) objects are there\?", q):
            want = sum(o["colour"] == m[1] for o in objects)
        else:
            noun = re.fullmatch(r"How many (\w+) are there\?", q)[1]
            want = sum(o["shape"] + ("es" if o["shape"].endswith("s") else "s") == noun for o in objects)
        assert row["answer"] == str(want) and want >= 1
        seen.add(want)
    assert len(seen) >= 3  # counts vary


def test_larger_names_the_box_with_the_larger_area():
    letters = set()
    for _, row in questions("synth_blink_larger"):
        picked = LETTERS.index(row["answer"])
        assert area(row["boxes"][picked]) >= 1.5 * area(row["boxes"][1 - picked])
        assert row["choices"] == ["{box0}", "{box1}"]
        letters.add(row["answer"])
    assert letters == {"A", "B"}


def test_relation_answer_matches_relation_holds():
    answers = set()
    for (_, _, scene), row in questions("synth_relation", 30):
        m = re.fullmatch(r"Is the (.+) (left of|right of|above|below) the (.+)\?", row["question"])
        a, b = named(scene["objects"], m[1]), named(scene["objects"], m[3])
        holds = _relation_holds(m[2], a["bbox"], b["bbox"])
        assert row["answer"] == ("yes" if holds else "no")
        if not holds:  # a "no" is clear: the opposite relation holds
            assert _relation_holds(OPPOSITE[m[2]], a["bbox"], b["bbox"])
        answers.add(row["answer"])
    assert answers == {"yes", "no"}


def test_attribute_and_multiple_choice_answers_name_the_object():
    asked = {"colour": r"What colour is the (.+)\?", "shape": r"What shape is the (.+)\?",
             "texture": r"What pattern does the (.+) have\?"}
    for benchmark in ("synth_attribute", "synth_mc"):
        for (_, _, scene), row in questions(benchmark, 20):
            objects = scene["objects"]
            attr, who = next((a, m[1]) for a, p in asked.items() if (m := re.fullmatch(p, row["question"])))
            fits = [o for o in objects if all(w in (o["size"], o["colour"], o["texture"], o["shape"], "object")
                                              for w in who.split()) and (attr == "shape") == who.endswith("object")]
            assert len(fits) == 1, (row["question"], objects)  # the name picks out exactly one object
            truth = fits[0][attr]
            if benchmark == "synth_mc":
                assert row["choices"].count(truth) == 1 and len(set(row["choices"])) == len(row["choices"]) == 4
                assert row["choices"][LETTERS.index(row["answer"])] == truth
            else:
                assert row["answer"] == truth and row["choices"] == []


def test_refexp_and_region_caption_answers():
    relational = 0
    for (_, _, scene), row in questions("synth_refexp", 20):
        objects = scene["objects"]
        captions = _captions(objects, relations=True)
        (target,) = [o for o, c in zip(objects, captions) if c == row["question"]]  # the expression is unique
        assert row["answer_boxes"] == [list(map(float, target["bbox"]))] and row["answer"] == ""
        relational += row["question"] != _describe(target)
    assert relational >= 10  # mostly the hard, relational captions
    for (_, _, scene), row in questions("synth_regcap"):
        (obj,) = [o for o in scene["objects"] if list(map(float, o["bbox"])) == row["boxes"][0]]
        assert row["answer"] == _describe(obj)


def test_ocr_answers_are_the_rendered_words():
    for (_, _, scene), row in questions("synth_ocr_page"):
        assert row["answer"] == " ".join(w for line in scene["lines"] for w, _ in line)
        assert 1 <= len(scene["lines"]) <= 3
    for (_, _, scene), row in questions("synth_ocr_box"):
        box = row["boxes"][0]
        inside = [w for line in scene["lines"] for w, b in line
                  if box[0] <= b[0] and box[1] <= b[1] and b[2] <= box[2] and b[3] <= box[3]]
        assert row["answer"] == " ".join(inside)
    for (img, _, scene), row in questions("synth_ocr_sign"):
        objects, signs = scene["objects"], scene["signs"]
        anchor = named(objects, re.fullmatch(r"What does the sign next to the (.+) say\?", row["question"])[1])
        (sign,) = [s for s in signs if objects[s["anchor"]] is anchor]
        assert row["answer"] == sign["word"] and len({s["word"] for s in signs}) == 2
        assert all(_gap(sign["bbox"], o["bbox"]) >= SIZE // 8 for o in objects if o is not anchor)
        assert _gap(sign["bbox"], anchor["bbox"]) <= SIZE // 16
        x1, y1, x2, y2 = (int(v) for v in sign["text_bbox"])
        ink = img.convert("L").crop((x1, y1, x2, y2))
        assert min(ink.getdata()) < 100 < max(ink.getdata())  # dark letters on the light sign


# ----------------------------------------------------------------------------------------------- prompts, training
@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_prompts_fill_boxes_in_the_processor_format(tiny_checkpoints, box_format):
    _, processor = load_tiny(tiny_checkpoints(box_format))
    rows = [generate_row(b, 0, "test", 0, SIZE) for b in BENCHMARKS]
    for row in rows:
        prompt = downstream_prompt(processor, row)
        assert "{box" not in processor.strip_markers(prompt)
        for box in row["boxes"]:
            assert processor.encode_box(box, (SIZE, SIZE)) in prompt
        ids = processor(images=[Image.new("RGB", (SIZE, SIZE))], text=[prompt])["input_ids"][0].tolist()
        if box_format == "tokens":  # the boxes are box tokens, not their spelling in plain text
            assert ids.count(processor.box_start_token_id) == len(row["boxes"])
        if row["metric"] == "choice":
            assert "\nA. " in prompt and "\nB. " in prompt
    # the words of a question stay user text: typed control strings are never tokens
    row = dict(rows[0], metric="exact", question="what is <box> in {box0}?", boxes=[[1.0, 2.0, 30.0, 40.0]])
    ids = processor(images=[Image.new("RGB", (SIZE, SIZE))], text=[downstream_prompt(processor, row)])["input_ids"][0]
    assert ids.tolist().count(processor.box_start_token_id) == (1 if box_format == "tokens" else 0)


def test_task_builder_turns_rows_into_training_examples(tiny_model_and_processor):
    processor = tiny_model_and_processor[1]
    rows = [generate_row(b, 0, "train", 1, SIZE) for b in BENCHMARKS]
    builder = TaskBuilder(processor, tasks=("downstream",))
    examples = list(builder.iter_examples(rows))
    assert [e["task"] for e in examples] == ["downstream"] * len(rows)
    counter = SkipCounter()
    batch = TaskCollator(processor, counter)(examples)
    eos = processor.tokenizer.eos_token
    for i, (row, ex) in enumerate(zip(rows, examples)):
        assert ex["prompt"] == downstream_prompt(processor, row) and ex["target"] == downstream_target(processor, row)
        assert ex["image"].size == (SIZE, SIZE)
        labels = batch["labels"][i]
        answer = processor.tokenizer.decode(labels[labels != -100])[: -len(eos)]
        if row["metric"] == "grounding_acc50":
            (got,) = processor.decode_boxes(answer, (SIZE, SIZE))
            assert all(abs(g - w) <= SIZE / processor.num_coord_bins for g, w in zip(got, row["answer_boxes"][0]))
        else:
            assert processor.strip_markers(answer) == row["answer"]
    broken = dict(rows[1], boxes=[])  # its question still says {box0}
    other = TaskBuilder(processor, tasks=("bbox2caption",))
    assert builder.examples(broken) == [] and other.examples(rows[0]) == []
    assert dict(builder.pending) == {"bad_placeholder": 1} and dict(other.pending) == {"not_a_task": 1}


# ----------------------------------------------------------------------------------------------- scoring
def _perfect(row):
    return {"text": row["answer"], "box": row["answer_boxes"][0] if row["answer_boxes"] else None}


def _wrong(row):
    if row["metric"] == "choice":
        return {"text": next(c for c in LETTERS[: len(row["choices"])] if c != row["answer"])}
    return {"text": "zzzz qqqq", "box": None}


def test_perfect_predictions_score_one_and_wrong_ones_zero():
    rows = [generate_row(b, 0, "test", i, SIZE) for b in BENCHMARKS for i in range(3)]
    perfect = score_predictions(rows, [_perfect(r) for r in rows])
    assert set(perfect["benchmarks"]) == set(BENCHMARKS)
    assert {b: s["score"] for b, s in perfect["benchmarks"].items()} == {b: 1.0 for b in BENCHMARKS}
    assert all(s["count"] == 3 for s in perfect["benchmarks"].values())
    assert perfect["families"] == {f: 1.0 for f in FAMILIES}
    wrong = score_predictions(rows, [_wrong(r) for r in rows])
    assert {b: s["score"] for b, s in wrong["benchmarks"].items()} == {b: 0.0 for b in BENCHMARKS}
    assert wrong["families"] == {f: 0.0 for f in FAMILIES}
    # ANLS gives partial credit where exact match gives none; families are means of their benchmarks
    page = [r for r in rows if r["benchmark"] == "synth_ocr_box"][:1]
    near = score_predictions(page, [{"text": page[0]["answer"][:-1] + "#"}])["benchmarks"]["synth_ocr_box"]
    if len(page[0]["answer"]) > 2:
        assert 0.5 < near["score"] < 1 and near["exact"] == 0
    mixed = score_predictions(rows, [_perfect(r) if r["benchmark"] == "synth_count" else _wrong(r) for r in rows])
    assert mixed["families"]["vqa"] == pytest.approx(1 / 4)


# ----------------------------------------------------------------------------------------------- the written set
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("downstream"))
    write_downstream(out, {"train": 3, "val": 2, "test": 2}, image_size=64, shard_bytes=20_000)
    return out


def test_written_splits_load_never_share_an_image_and_validate(written, capsys):
    from granvit.train.data.cli import main

    splits = {s: load_dataset(written, split=s) for s in ("train", "val", "test")}
    test = splits["test"]
    assert sorted(test["benchmark"]) == sorted([b for b in BENCHMARKS] * 2)
    assert set(test.features) == {"image", "image_id", "width", "height", "benchmark", "family", "metric", "question",
                                  "boxes", "answer", "answer_boxes", "choices"}
    assert test[0]["image"].size == (64, 64)
    digests = {}
    for split, ds in splits.items():
        ds = ds.cast_column("image", ds.features["image"].__class__(decode=False))
        digests[split] = {hashlib.sha256(im["bytes"]).hexdigest() for im in ds["image"]}
        assert len(digests[split]) == len(ds)  # every row its own image
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not digests[a] & digests[b]
    assert main(["validate", written]) == 0
    assert '"ok": 70' in capsys.readouterr().out


def test_evaluate_downstream_end_to_end(written, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    result = evaluate_downstream(model, processor, written, split="test", limit_per_benchmark=1, progress=False)
    assert set(result["benchmarks"]) == set(BENCHMARKS) and set(result["families"]) == set(FAMILIES)
    for bench in result["benchmarks"].values():
        assert bench["count"] == 1 and 0.0 <= bench["score"] <= 1.0
    refexp = result["benchmarks"]["synth_refexp"]
    assert refexp["invalid"] == 0  # the box grammar: every grounding answer holds a box
