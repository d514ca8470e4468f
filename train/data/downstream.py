"""Downstream benchmarks on the synthetic set: questions with short, unambiguous answers, asked of generated scenes.

The paper's headline table compares encoders *after transfer*: each encoder is frozen, a fresh MLLM is trained on a
downstream mix and scored on held-out benchmarks in three families (fine-grained, VQA, OCR). These are small synthetic
stand-ins for those benchmarks, read the same way by training and evaluation:

    granvit-data downstream OUT --train 1000 --val 50 --test 100 --image-size 128    # rows per benchmark and split
    load_dataset(OUT, split="test")                                                 # every benchmark, N rows each

| benchmark | family | metric | question (answer) |
|---|---|---|---|
| `synth_refexp` | fine-grained | `grounding_acc50` | "small red triangle left of the blue circle" (its box; relational for twins) |
| `synth_regcap` | fine-grained | `exact` | "Describe the object in {box0}." ("small red striped triangle") |
| `synth_blink_larger` | fine-grained | `choice` | "Which box holds the larger object?" A: {box0}, B: {box1} ("A") |
| `synth_count` | vqa | `exact` | "How many red objects are there?" ("2") |
| `synth_attribute` | vqa | `exact` | "What colour is the large striped star?" ("blue"); also shape and pattern |
| `synth_relation` | vqa | `exact` | "Is the red circle left of the green square?" ("yes" / "no") |
| `synth_mc` | vqa | `choice` | "What shape is the red object?" with 4 options, distractors from the scene first ("C") |
| `synth_ocr_box` | ocr | `anls` | "What is written in {box0}?" (a word or a line of a page) |
| `synth_ocr_page` | ocr | `anls` | "What is written in the image?" (a short page, 1-3 lines, read top to bottom, left to right) |
| `synth_ocr_sign` | ocr | `anls` | "What does the sign next to the red circle say?" ("pharmacy"; a scene with two signs) |

Every row is one question about its own image, a pure function of (seed, split, benchmark, index): splits and
benchmarks never share an image, and any shard can be regenerated alone. Questions are only asked when they hold
clearly: objects are named by their shortest attribute combination that no other object of the scene shares (a
word that is not written constrains nothing: "the red circle" is the only red circle, whatever its pattern);
relations hold by `synth._relation_holds` (a centre beyond the other box's edge) and a "no" asks the opposite of one
that holds; the two boxes of the BLINK-like question differ by 1.5x in box area and in painted area; objects never
overlap; a sign sits next to its object and at least 1/8 of the image away from every other object.

The row schema (`DOWNSTREAM_FEATURES`; one row per question):

| field | type | meaning |
|---|---|---|
| `image`, `image_id`, `width`, `height` | as in the Gran format | the image (JPEG bytes); boxes are in its pixels |
| `benchmark` | string | e.g. `synth_count` |
| `family` | string | `fine-grained` \\| `vqa` \\| `ocr` (the family names of `eval/benchmarks.py`) |
| `metric` | string | `grounding_acc50` \\| `exact` \\| `anls` \\| `choice` (how `eval/downstream.py` scores it) |
| `question` | string | the question; `{box0}`, `{box1}`, ... stand for `boxes[0]`, `boxes[1]`, ... |
| `boxes` | list of 4 x float32 | [x1, y1, x2, y2] pixels of the placeholders |
| `answer` | string | the short answer; for `choice` the option's letter; empty for grounding |
| `answer_boxes` | list of 4 x float32 | grounding: the target box; empty otherwise |
| `choices` | list of string | `choice`: the options, lettered A, B, ... (they may hold placeholders); empty otherwise |

Placeholders stay placeholders in the data because the box format belongs to the checkpoint: `downstream_prompt`
fills them with `processor.encode_box` (text `[x1, y1, x2, y2]` bins or `<box><coord_..>..</box>` tokens) and builds
the prompt the way `granvit-eval` prompts real benchmarks (`eval/run.py`): grounding through
`processor.caption2bbox_prompt`, other questions through the processor's VQA template, with the options and the
letter instruction (`choice`) or the short-answer instruction (`exact`) appended. `downstream_target` is the answer
in the same format, so training (`TaskBuilder(processor, tasks=("downstream",))`) and scoring read one truth.

Image size: objects and text scale with `--image-size`: sign text is 1/9 of the side tall (14 px at 128 px), page
text 1/12 to 1/7 (10-18 px at 128 px). The pixels hold legible text at every size from 128 px (the embedded PP-OCR
finds every sign word and reads the short pages at ANLS 0.93-0.97 at 128, 256 and 512 px: BENCHMARKS.md); what
limits reading is the encoder: at the quickstart's 128 px with 32 px patches a sign word covers one to three of the 16
image tokens, at 512 px with 16 px patches several dozen of the 1024. Generate at the model's input size: the image
processor resizes larger images down, and their text with them.
"""
from __future__ import annotations

import io
import itertools
import zlib
from dataclasses import dataclass

import numpy as np
from datasets import Features, Image, List, Value

# The row format both training and evaluation read (letters, placeholders, the prompt) is gran_format.py's.
from ...gran_format import LETTERS, PLACEHOLDER, downstream_prompt, fill_boxes  # noqa: F401
from .schema import DEFAULT_ROW_GROUP_SIZE, DEFAULT_SHARD_BYTES, BadRecord, box_reason, decode_image, write_dataset_card
from .schema import write_split
from .synth import RELATIONS, SPLITS, SynthConfig, _captions, _describe, _relation_holds, draw_page, draw_scene
from .synth import draw_sign_scene

DOWNSTREAM_FEATURES = Features(
    {
        "image": Image(),
        "image_id": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "benchmark": Value("string"),
        "family": Value("string"),
        "metric": Value("string"),
        "question": Value("string"),
        "boxes": List(List(Value("float32"), length=4)),
        "answer": Value("string"),
        "answer_boxes": List(List(Value("float32"), length=4)),
        "choices": List(Value("string")),
    }
)
METRICS = ("grounding_acc50", "exact", "anls", "choice")

# ----------------------------------------------------------------------------------------------- scenes
# SynthConfig overrides per scene kind (the image size comes from the caller). Objects never overlap, so counts and
# relations are never in doubt.
OBJECTS = dict(min_objects=2, max_objects=4, object_size=(0.15, 0.35), max_overlap=0.0, ocr_fraction=0.0)
SCENES = {
    "objects": OBJECTS,
    # twins planted often, so that most expressions need a relation or a position to pick out one object
    "twins": dict(OBJECTS, min_objects=3, max_objects=5, object_size=(0.12, 0.3), duplicate_prob=0.5),
    # fewer shapes and colours, so that counting one colour or shape often gives more than 1
    "crowd": dict(OBJECTS, min_objects=1, max_objects=6, object_size=(0.12, 0.28),
                  shapes=("circle", "square", "triangle", "star"), colours=("red", "green", "blue", "yellow")),
    "signs": dict(OBJECTS, max_objects=3, object_size=(0.15, 0.3), allow_duplicates=False),
    "page": dict(ocr_fraction=1.0),
}


def scene_config(scene: str, image_size: int) -> SynthConfig:
    return SynthConfig(image_size=image_size, **SCENES[scene])


def page_font_px(size: int) -> tuple[int, int]:
    """Page text height range: 1/12 to 1/7 of the image side (the Gran pages use 1/20 to 1/8)."""
    return max(8, size // 12), max(9, size // 7)


# ----------------------------------------------------------------------------------------------- naming
ATTRIBUTES = ("size", "colour", "texture", "shape")


def name(obj: dict, objects: list[dict], omit: tuple = ()) -> str | None:
    """The shortest name ("red circle", "large striped object") that fits `obj` and no other object of the scene,
    built from the attributes not in `omit` (the noun is the shape, or "object" when the shape is omitted); None when
    every such name also fits another object (a twin). Only written words constrain: "red circle" rules out every
    other red circle, striped or not."""
    keys = [k for k in ATTRIBUTES if k not in omit and obj[k]]  # size is "" with one size bin
    for n in range(1, len(keys) + 1):
        for combo in itertools.combinations(keys, n):
            if "shape" in keys and "shape" not in combo:
                continue  # a noun first: "the red circle" before "the red object"
            others = [o for o in objects if o is not obj and all(o[k] == obj[k] for k in combo)]
            if not others:
                noun = obj["shape"] if "shape" in combo else "object"
                return " ".join([obj[k] for k in combo if k != "shape"] + [noun])
    return None


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _box(b) -> list[float]:
    return [float(v) for v in b]


# ----------------------------------------------------------------------------------------------- questions
# Each maker draws a scene from `rng` and returns (image, question fields, scene graph) or None when this scene cannot
# give an unambiguous question (the caller draws the next scene from the same rng, so a row stays a pure function).
# The scene graph ({"objects"} / {"lines"} / {"objects", "signs"}, as synth.py draws them) is what tests check
# the answers against.
def _refexp(rng, size):
    img, objects = draw_scene(scene_config("twins", size), rng)
    captions = _captions(objects, relations=True)
    unique = [i for i, c in enumerate(captions) if captions.count(c) == 1]
    relational = [i for i in unique if captions[i] != _describe(objects[i])]  # a twin told apart by a relation
    pool = relational or unique
    if not pool:
        return None
    i = _pick(rng, pool)
    return img, dict(question=captions[i], answer_boxes=[_box(objects[i]["bbox"])]), {"objects": objects}


def _regcap(rng, size):
    img, objects = draw_scene(scene_config("objects", size), rng)
    obj = _pick(rng, objects)
    fields = dict(question="Describe the object in {box0}.", boxes=[_box(obj["bbox"])], answer=_describe(obj))
    return img, fields, {"objects": objects}


def _area(o):
    x1, y1, x2, y2 = o["bbox"]
    return (x2 - x1) * (y2 - y1)


def _blink_larger(rng, size):
    img, objects = draw_scene(scene_config("objects", size), rng)
    # larger by 1.5x both in box area and in painted area: a star fills less of its box than a square
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2)
             if _area(a) >= 1.5 * _area(b) and a["area"] >= 1.5 * b["area"]]
    if not pairs:
        return None
    large, small = _pick(rng, pairs)
    first = int(rng.integers(2))  # where the larger one goes: A or B
    boxes = [_box(large["bbox"]), _box(small["bbox"])] if first == 0 else [_box(small["bbox"]), _box(large["bbox"])]
    fields = dict(question="Which box holds the larger object?", boxes=boxes, choices=["{box0}", "{box1}"],
                  answer=LETTERS[first])
    return img, fields, {"objects": objects}


def _count(rng, size):
    cfg = scene_config("crowd", size)
    img, objects = draw_scene(cfg, rng)
    kind = _pick(rng, ("all", "shape", "colour"))
    if kind == "all":
        return img, dict(question="How many objects are there?", answer=str(len(objects))), {"objects": objects}
    value = _pick(rng, sorted({o[kind] for o in objects}))
    noun = f"{_plural(value)}" if kind == "shape" else f"{value} objects"
    count = sum(o[kind] == value for o in objects)
    return img, dict(question=f"How many {noun} are there?", answer=str(count)), {"objects": objects}


ASK = {  # asked attribute -> question about a named object
    "colour": "What colour is the {name}?",
    "shape": "What shape is the {name}?",
    "texture": "What pattern does the {name} have?",
}


def _attribute_question(rng, objects, asked_from):
    asked = _pick(rng, asked_from)
    obj = _pick(rng, objects)
    who = name(obj, objects, omit=(asked,))
    if who is None:
        return None
    return obj, asked, ASK[asked].format(name=who)


def _attribute(rng, size):
    cfg = scene_config("objects", size)
    img, objects = draw_scene(cfg, rng)
    picked = _attribute_question(rng, objects, ("colour", "shape") + (("texture",) if len(cfg.textures) > 1 else ()))
    if picked is None:
        return None
    obj, asked, question = picked
    return img, dict(question=question, answer=obj[asked]), {"objects": objects}


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _relation(rng, size):
    img, objects = draw_scene(scene_config("objects", size), rng)
    a, b = (objects[int(i)] for i in rng.permutation(len(objects))[:2])
    holding = [rel for rel in RELATIONS if _relation_holds(rel, a["bbox"], b["bbox"])]
    name_a, name_b = name(a, objects), name(b, objects)
    if not holding or name_a is None or name_b is None:
        return None
    rel = _pick(rng, holding)
    yes = rng.random() < 0.5
    if not yes:  # the opposite of a relation that holds clearly does not hold
        rel = OPPOSITE[rel]
    fields = dict(question=f"Is the {name_a} {rel} the {name_b}?", answer="yes" if yes else "no")
    return img, fields, {"objects": objects}


def _mc(rng, size):
    cfg = scene_config("objects", size)
    img, objects = draw_scene(cfg, rng)
    picked = _attribute_question(rng, objects, ("colour", "shape"))
    if picked is None:
        return None
    obj, asked, question = picked
    values = cfg.colours if asked == "colour" else cfg.shapes
    # distractors: what other objects of the scene have first (the question is about *this* object), then the rest
    in_scene = [v for v in dict.fromkeys(o[asked] for o in objects) if v != obj[asked]]
    rest = [v for v in values if v != obj[asked] and v not in in_scene]
    distractors = ([in_scene[int(i)] for i in rng.permutation(len(in_scene))] +
                   [rest[int(i)] for i in rng.permutation(len(rest))])[:3]
    choices = [obj[asked]] + distractors
    order = [int(i) for i in rng.permutation(len(choices))]
    choices = [choices[i] for i in order]
    return img, dict(question=question, choices=choices, answer=LETTERS[order.index(0)]), {"objects": objects}


def _ocr_box(rng, size):
    img, lines = draw_page(scene_config("page", size), rng, font_px=page_font_px(size))
    if not lines:
        return None
    multi = [ln for ln in lines if len(ln) > 1]
    if multi and rng.random() < 0.5:  # a whole line
        line = _pick(rng, multi)
        boxes = [b for _, b in line]
        box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        text = " ".join(w for w, _ in line)
    else:  # one word
        text, box = _pick(rng, [wb for ln in lines for wb in ln])
    return img, dict(question="What is written in {box0}?", boxes=[_box(box)], answer=text), {"lines": lines}


def _ocr_page(rng, size):
    img, lines = draw_page(scene_config("page", size), rng, max_lines=3, max_words=3, font_px=page_font_px(size))
    if not lines:
        return None
    text = " ".join(w for ln in lines for w, _ in ln)  # reading order: lines top to bottom, words left to right
    return img, dict(question="What is written in the image?", answer=text), {"lines": lines}


def _ocr_sign(rng, size):
    img, objects, signs = draw_sign_scene(scene_config("signs", size), rng, num_signs=2)
    if len(signs) < 2:
        return None
    sign = _pick(rng, signs)
    who = name(objects[sign["anchor"]], objects)
    if who is None:
        return None
    fields = dict(question=f"What does the sign next to the {who} say?", answer=sign["word"])
    return img, fields, {"objects": objects, "signs": signs}


@dataclass(frozen=True)
class Benchmark:
    name: str
    family: str  # eval/benchmarks.py FAMILIES
    metric: str  # METRICS
    make: object  # (rng, image_size) -> (PIL image, question fields, scene graph) | None


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("synth_refexp", "fine-grained", "grounding_acc50", _refexp),
        Benchmark("synth_regcap", "fine-grained", "exact", _regcap),
        Benchmark("synth_blink_larger", "fine-grained", "choice", _blink_larger),
        Benchmark("synth_count", "vqa", "exact", _count),
        Benchmark("synth_attribute", "vqa", "exact", _attribute),
        Benchmark("synth_relation", "vqa", "exact", _relation),
        Benchmark("synth_mc", "vqa", "choice", _mc),
        Benchmark("synth_ocr_box", "ocr", "anls", _ocr_box),
        Benchmark("synth_ocr_page", "ocr", "anls", _ocr_page),
        Benchmark("synth_ocr_sign", "ocr", "anls", _ocr_sign),
    )
}


def make_question(benchmark: str, seed: int, split: str, index: int, image_size: int = 128):
    """(PIL image, question fields, scene graph) of one row, a pure function of its arguments."""
    bench = BENCHMARKS[benchmark]
    # The benchmark's name (not its position in the table) seeds its images: adding a benchmark changes no other.
    rng = np.random.default_rng([seed, SPLITS.index(split), zlib.crc32(benchmark.encode()), index])
    for _ in range(100):
        made = bench.make(rng, image_size)
        if made is not None:
            return made
    raise RuntimeError(f"{benchmark}: no answerable question in 100 scenes at {image_size} px")


def generate_row(benchmark: str, seed: int, split: str, index: int, image_size: int = 128) -> dict:
    """One downstream row (schema above), a pure function of its arguments."""
    bench = BENCHMARKS[benchmark]
    img, fields, _ = make_question(benchmark, seed, split, index, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=SynthConfig.jpeg_quality)  # as the Gran scenes
    return {
        "image": {"bytes": buf.getvalue(), "path": None},
        "image_id": f"synth-{seed}-{split}-{benchmark}-{index:06d}",
        "width": img.width,
        "height": img.height,
        "benchmark": benchmark,
        "family": bench.family,
        "metric": bench.metric,
        "question": fields["question"],
        "boxes": fields.get("boxes", []),
        "answer": fields.get("answer", ""),
        "answer_boxes": fields.get("answer_boxes", []),
        "choices": fields.get("choices", []),
    }


# ----------------------------------------------------------------------------------------------- shards
@dataclass
class DownstreamProducer:
    """Shard producer for `write_split`: item i of a split is row i % n of benchmark i // n."""

    benchmarks: tuple
    per_benchmark: int
    seed: int
    split: str
    image_size: int

    def __call__(self, start: int, stop: int, counts: dict):
        for i in range(start, stop):
            yield generate_row(self.benchmarks[i // self.per_benchmark], self.seed, self.split,
                               i % self.per_benchmark, self.image_size)

    def plan(self) -> dict:
        return {"source": "synth-downstream", "seed": self.seed, "image_size": self.image_size,
                "benchmarks": list(self.benchmarks), "per_benchmark": self.per_benchmark}


def write_downstream(out_dir: str, sizes: dict[str, int], image_size: int = 128, seed: int = 0,
                     benchmarks=None, num_proc: int = 1, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     shard_multiple: int = 1, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """Write {split: rows per benchmark} of every benchmark (default all) as shards + card; returns counts."""
    benchmarks = tuple(benchmarks or BENCHMARKS)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    counts = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        probe = [len(generate_row(b, seed, split, 0, image_size)["image"]["bytes"]) + 300 for b in benchmarks]
        total = int(np.mean(probe) * n * len(benchmarks))
        producer = DownstreamProducer(benchmarks, n, seed, split, image_size)
        counts[split] = write_split(out_dir, split, producer, n * len(benchmarks), total, shard_bytes, shard_multiple,
                                    row_group_size, num_proc, features=DOWNSTREAM_FEATURES)
    write_dataset_card(
        out_dir, pretty_name="Synthetic downstream benchmarks", features=DOWNSTREAM_FEATURES,
        task_categories=["visual-question-answering", "image-text-to-text"],
        body=(f"Generated by `granvit-data downstream` (seed {seed}, {image_size} px): one question per row, "
              f"benchmarks {', '.join(benchmarks)}. Schema and prompts: `granvit/train/data/downstream.py`. Load with "
              "`load_dataset(path, split='test')`; one benchmark: `.filter(lambda b: b == 'synth_count', "
              "input_columns='benchmark')`.\n"),
    )
    return counts


# ----------------------------------------------------------------------------------------------- rows -> prompts
def check_row(row) -> str | None:
    """Why a downstream row cannot be asked (schema.REASONS), or None. The image is not decoded here."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        return "wrong_type"
    width, height = row.get("width"), row.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return "wrong_type"
    if row.get("image") is None:
        return "missing_image"
    if row.get("metric") not in METRICS:
        return "unknown_metric"
    boxes, answer_boxes, choices = row.get("boxes") or [], row.get("answer_boxes") or [], row.get("choices") or []
    for box in [*boxes, *answer_boxes]:
        reason = box_reason(list(box), width, height)
        if reason:
            return reason
    used = {int(k) for text in [row["question"], *choices] for k in PLACEHOLDER.findall(text)}
    if used != set(range(len(boxes))):  # every placeholder has its box and every box is asked about
        return "bad_placeholder"
    if row["metric"] == "grounding_acc50":
        return None if answer_boxes else "empty_answer"
    if not row["answer"].strip():
        return "empty_answer"
    if row["metric"] == "choice" and (len(choices) < 2 or row["answer"] not in LETTERS[: len(choices)]):
        return "bad_choice"
    return None


def validate_row(row, decode: bool = True) -> str | None:
    """`check_row`, and with `decode` the image decoded and its size checked (`granvit-data validate`)."""
    reason = check_row(row)
    if reason or not decode:
        return reason
    try:
        image = decode_image(row["image"])
    except BadRecord as e:
        return e.reason
    return "size_mismatch" if image.size != (row["width"], row["height"]) else None


def downstream_target(processor, row: dict) -> str:
    """The answer a row trains towards: the target box in the box format (grounding) or the answer as user text."""
    if row["metric"] == "grounding_acc50":
        return processor.encode_boxes(row["answer_boxes"], (row["width"], row["height"]))
    return processor.plain_text(row["answer"])


def downstream_example(processor, row: dict):
    """(RGB image, prompt, target, boxes) of a row for training; raises BadRecord (schema.REASONS) for a broken row.
    `TaskBuilder` (task "downstream") wraps it into the examples every stage trainer reads."""
    reason = check_row(row)
    if reason:
        raise BadRecord(reason, row.get("image_id", "") if isinstance(row, dict) else "")
    if row["width"] * row["height"] > processor.image_processor.max_image_pixels:
        raise BadRecord("image_too_large", row["image_id"])  # the image processor would refuse it at collation
    image = decode_image(row["image"])
    if image.size != (row["width"], row["height"]):
        raise BadRecord("size_mismatch", row["image_id"])
    boxes = [[float(v) for v in b] for b in [*row["boxes"], *row["answer_boxes"]]]
    return image.convert("RGB"), downstream_prompt(processor, row), downstream_target(processor, row), boxes
