"""The benchmark registry: where each benchmark lives on the Hub, which fields it has, and how it is scored.

Every benchmark is read either from its public Hub distribution (the lmms-lab / author mirrors that
lmms-eval v0.7.2 uses) or from a local Parquet / JSONL file with the same columns (`--data PATH`).
Rows become *samples*: plain dicts with the canonical keys of their task type

    grounding        id, image, expression, box                 (box: [x1, y1, x2, y2] pixels)
    region_caption   id, image, box, references
    vqa              id, image, question, answers [, subset]
    multiple_choice  id, image, question, options {"A": text}, answer (a letter), group
    ocr              id, image, question, answers, subset

so the runner and the metrics never see a benchmark's own column names. A row without a required
column raises ValueError naming the benchmark, the field and the row.
"""
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from datasets import concatenate_datasets, load_dataset
from PIL import Image

from granvit.box_utils_granvit import xywh_to_xyxy
from granvit.gran_format import decode_image

FAMILIES = ("fine-grained", "vqa", "ocr")
TASK_TYPES = ("grounding", "region_caption", "vqa", "multiple_choice", "ocr")


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_id: str
    split: str
    family: str
    task_type: str
    metric: str           # key into run.SCORERS; the first number it returns is the headline
    fields: tuple         # Hub columns every row must have
    to_samples: Callable  # (row, row_index) -> list of samples
    config: str = None    # the Hub dataset's config name, if any
    in_average: bool = True  # counted in the paper's family average (its headline is a 0-1 score)
    note: str = ""


# ----------------------------------------------------------------------------- row -> samples

def _require(row, names, bench, index):
    for name in names:
        if name not in row or row[name] is None:
            raise ValueError(f"{bench}: row {index} has no field '{name}'")


def _refcoco_grounding(row, i):
    # One row holds every referring expression of one object; each becomes its own sample (as lmms-eval does).
    exprs = [row["answer"]] if isinstance(row["answer"], str) else list(row["answer"])
    box = xywh_to_xyxy(row["bbox"])
    return [{"id": f"{row['question_id']}#{k}", "image": row["image"], "expression": e, "box": box}
            for k, e in enumerate(exprs)]


def _refcoco_caption(row, i):
    refs = [row["answer"]] if isinstance(row["answer"], str) else list(row["answer"])
    return [{"id": str(row["question_id"]), "image": row["image"], "box": xywh_to_xyxy(row["bbox"]),
             "references": refs}]


def _vqa(id_key, answers_key):
    def convert(row, i):
        answers = row[answers_key]
        return [{"id": str(row[id_key]), "image": row["image"], "question": row["question"],
                 "answers": [answers] if isinstance(answers, str) else list(answers)}]
    return convert


def _chartqa(row, i):
    # ChartQA has no id column; the row index is stable for a fixed split. "type" is human_test / augmented_test.
    return [{"id": str(i), "image": row["image"], "question": row["question"], "answers": [str(row["answer"])],
             "subset": row.get("type", "")}]


def _ocrbench(row, i):
    answers = row["answer"]
    return [{"id": str(i), "image": row["image"], "question": row["question"],
             "answers": [answers] if isinstance(answers, str) else list(answers), "subset": row["dataset"]}]


def _hallusion(row, i):
    # gt_answer is "1" (yes) / "0" (no); figure and question groups give HallusionBench's fAcc / qAcc.
    key = f"{row['category']}_{row['subcategory']}_{row['set_id']}"
    return [{"id": f"{key}_{row['figure_id']}_{row['question_id']}", "image": row["image"],
             "question": row["question"], "answers": [str(row["gt_answer"])],
             "subset": f"{key}_{row['figure_id']}", "group": f"{key}_{row['question_id']}"}]


def _letter_options(row, letters="ABCDE"):
    # MMBench leaves unused options empty / NaN; they are not offered.
    opts = {}
    for k in letters:
        v = row.get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() and str(v) != "nan":
            opts[k] = str(v)
    return opts


def _mmbench(row, i):
    # CircularEval: the distribution already holds each question's option rotations as extra rows with
    # index + k * 1e6; a question counts only if every rotation of it is right (VLMEvalKit's g_index).
    hint = row.get("hint")
    question = row["question"] if not hint or str(hint) == "nan" else f"{hint}\n{row['question']}"
    return [{"id": str(row["index"]), "image": row["image"], "question": question,
             "options": _letter_options(row), "answer": row["answer"], "group": str(int(row["index"]) % 1_000_000)}]


def _mmstar(row, i):
    # MMStar puts the options inside the question text ("Options: A: ..., B: ..."), so only letters are matched.
    return [{"id": str(row["index"]), "image": row["image"], "question": row["question"],
             "options": {k: "" for k in "ABCD"}, "answer": row["answer"], "group": str(row["index"])}]


def _seed(row, i):
    # The image column is a list (several frames for video questions); image questions have one.
    image = row["image"][0] if isinstance(row["image"], list) else row["image"]
    opts = {k.upper(): row[f"choice_{k}"] for k in "abcd"}
    return [{"id": str(row["question_id"]), "image": image, "question": row["question"], "options": opts,
             "answer": row["answer"], "group": str(row["question_id"])}]


def _blink(row, i):
    # BLINK has 1-4 images per question; they are tiled left to right into one image for a one-image model.
    images = [row[k] for k in ("image_1", "image_2", "image_3", "image_4") if row.get(k) is not None]
    letters = "ABCDEFGH"[: len(row["choices"])]
    return [{"id": str(row["idx"]), "image": images if len(images) > 1 else images[0], "question": row["question"],
             "options": dict(zip(letters, row["choices"])), "answer": row["answer"].strip("()"),
             "group": str(row["idx"])}]


REFCOCO_FIELDS = ("question_id", "image", "answer", "bbox")
BLINK_SUBTASKS = ("Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
                  "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
                  "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity")
VQA_NOTE = "answers: the 10 human answers"

BENCHMARKS = {b.name: b for b in [
    # fine-grained -------------------------------------------------------------------------------
    Benchmark("refcoco_val", "lmms-lab/RefCOCO", "val", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding, note="bbox is COCO xywh pixels; answer: list of expressions"),
    Benchmark("refcoco_testA", "lmms-lab/RefCOCO", "testA", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding),
    Benchmark("refcoco_testB", "lmms-lab/RefCOCO", "testB", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding),
    Benchmark("refcoco+_val", "lmms-lab/RefCOCOPlus", "val", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding),
    Benchmark("refcocog_val", "lmms-lab/RefCOCOg", "val", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding),
    Benchmark("refcocog_test", "lmms-lab/RefCOCOg", "test", "fine-grained", "grounding", "grounding",
              REFCOCO_FIELDS, _refcoco_grounding),
    Benchmark("refcocog_caption_val", "lmms-lab/RefCOCOg", "val", "fine-grained", "region_caption", "caption",
              REFCOCO_FIELDS, _refcoco_caption, in_average=False,
              note="region captioning: box -> expression; CIDEr-D is not a 0-1 score, so not averaged"),
    Benchmark("blink", "BLINK-Benchmark/BLINK", "val", "fine-grained", "multiple_choice", "choice",
              ("idx", "image_1", "question", "choices", "answer"), _blink,
              note="one Hub config per sub-task; all 14 are concatenated unless --config picks one"),
    # vqa ----------------------------------------------------------------------------------------
    Benchmark("mmbench_en_dev", "lmms-lab/MMBench", "dev", "vqa", "multiple_choice", "circular_choice",
              ("index", "image", "question", "A", "B", "answer"), _mmbench, config="en",
              note="CircularEval over the rotated copies (index + k * 1e6) the split already contains"),
    Benchmark("mmstar", "Lin-Chen/MMStar", "val", "vqa", "multiple_choice", "choice",
              ("index", "image", "question", "answer"), _mmstar),
    Benchmark("hallusionbench", "lmms-lab/HallusionBench", "image", "vqa", "vqa", "yes_no",
              ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer", "image"),
              _hallusion, note="gt_answer 1 = yes, 0 = no; reports aAcc, fAcc, qAcc"),
    Benchmark("gqa", "lmms-lab/GQA", "testdev", "vqa", "vqa", "gqa_exact",
              ("id", "imageId", "question", "answer", "image"), _vqa("id", "answer"),
              config="testdev_balanced_instructions",
              note="images live in config testdev_balanced_images (joined on imageId by the Hub loader)"),
    Benchmark("seedbench", "lmms-lab/SEED-Bench", "test", "vqa", "multiple_choice", "choice",
              ("question_id", "image", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer"), _seed,
              note="image questions only (data_type == 'image')"),
    # ocr ----------------------------------------------------------------------------------------
    Benchmark("ocrbench", "echo840/OCRBench", "test", "ocr", "ocr", "ocrbench",
              ("image", "question", "answer", "dataset"), _ocrbench, note="score: correct answers out of 1000"),
    Benchmark("docvqa_val", "lmms-lab/DocVQA", "validation", "ocr", "vqa", "anls",
              ("questionId", "image", "question", "answers"), _vqa("questionId", "answers"), config="DocVQA"),
    Benchmark("chartqa", "lmms-lab/ChartQA", "test", "ocr", "vqa", "relaxed",
              ("image", "question", "answer"), _chartqa),
    Benchmark("infovqa_val", "lmms-lab/DocVQA", "validation", "ocr", "vqa", "anls",
              ("questionId", "image", "question", "answers"), _vqa("questionId", "answers"),
              config="InfographicVQA"),
    Benchmark("textvqa_val", "lmms-lab/textvqa", "validation", "ocr", "vqa", "vqa_accuracy",
              ("question_id", "image", "question", "answers"), _vqa("question_id", "answers"), note=VQA_NOTE),
]}


# ----------------------------------------------------------------------------- loading

def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def load_rows(bench: Benchmark, data: str | None = None, config: str | None = None):
    """The benchmark's rows: a local Parquet/JSONL file (same columns as the Hub) or the Hub distribution."""
    if data is not None:
        if not os.path.exists(data):
            raise FileNotFoundError(f"benchmark file {data} does not exist")
        builder = "parquet" if data.endswith(".parquet") else "json"
        if builder == "json" and not data.endswith((".jsonl", ".json")):
            raise ValueError(f"benchmark file {data}: expected .parquet or .jsonl")
        return load_dataset(builder, data_files=data, split="train")
    if bench.name == "blink" and config is None:
        return concatenate_datasets([load_dataset(bench.hub_id, c, split=bench.split) for c in BLINK_SUBTASKS])
    rows = load_dataset(bench.hub_id, config or bench.config, split=bench.split)
    if bench.name == "gqa":
        # GQA questions reference images by imageId; the images are a separate config of the same repo.
        images = load_dataset(bench.hub_id, "testdev_balanced_images", split=bench.split)
        index = {img_id: k for k, img_id in enumerate(images["id"])}
        rows = rows.map(lambda r: {"image": images[index[r["imageId"]]]["image"]})
    if bench.name == "seedbench":
        rows = rows.filter(lambda r: r["data_type"] == "image")
    return rows


def iter_samples(bench: Benchmark, rows, base_dir: str = "."):
    """Yield canonical samples (images decoded to RGB PIL) from rows, checking required fields row by row."""
    for i, row in enumerate(rows):
        _require(row, bench.fields, bench.name, i)
        for sample in bench.to_samples(row, i):
            sample["image"] = to_pil(sample["image"], base_dir)
            yield sample


def to_pil(image, base_dir: str = "."):
    """An RGB image from a PIL image, an HF Image cell ({bytes, path}), a path (relative to `base_dir`), or a list
    (tiled side by side): EXIF-upright and converted as the model converts it (`gran_format.decode_image`)."""
    if isinstance(image, list):
        parts = [to_pil(im, base_dir) for im in image]
        canvas = Image.new("RGB", (sum(p.width for p in parts), max(p.height for p in parts)), "white")
        x = 0
        for p in parts:
            canvas.paste(p, (x, 0))
            x += p.width
        return canvas
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image.get("path")
    if isinstance(image, (str, os.PathLike)):
        image = os.path.join(base_dir, image)  # an absolute path stays as it is
    return decode_image(image, rgb=True)
