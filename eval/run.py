"""`granvit-eval`: score a GranViT checkpoint on a benchmark, resumably, and write scores + a report.

    granvit-eval --model ./granvit-ckpt --benchmark refcoco_val --limit 500 --batch-size 16 --output eval_out
    granvit-eval --model org/granvit --benchmark docvqa_val --data docvqa_val.parquet   # local file, Hub columns
    granvit-eval --model ./granvit-ckpt --benchmark gran --data ./my-gran-set --split test  # any local Gran split

Layout of --output: <benchmark>/predictions.jsonl (one line per sample, appended per batch, so a rerun
continues where it stopped), <benchmark>/boxes.png + boxes.html (grounding only), scores.json (every
benchmark scored into this folder) and report.md (a table per benchmark and the paper's family averages).

`evaluate_synthetic` scores a Gran split (grounding and region captions, every region one query): the main job and
the experiments call it, and `--benchmark gran` runs it on any local Gran folder or Parquet file.

Grounding decodes the way users decode, through `model.ground`'s box grammar (`BoxConstraintLogitsProcessor` with
the answer forced to start with a box, or "not found" for a checkpoint trained with negatives) inside batched
`generate`; each prediction keeps its box's score (grounding_granvit.py `box_scores`), and the score's AUROC for
correct (IoU >= 0.5) against wrong boxes is reported; the unconstrained answers are scored too, under
`*_unconstrained` keys. GranViT checkpoints load natively (importing this module imports `granvit`, which registers
the Auto classes), so no code from the checkpoint runs; other checkpoints that ship code need `--trust-remote-code`.
"""
import argparse
import json
import os
import sys

import torch
from datasets import get_dataset_split_names, load_dataset
from datasets.data_files import EmptyDatasetError
from tqdm import tqdm
from transformers import CONFIG_MAPPING, AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList, PreTrainedConfig

from granvit.console import UserError, check_model_source, console_main
from granvit.eval import metrics as M
from granvit.eval.benchmarks import BENCHMARKS, TASK_TYPES, get_benchmark, iter_samples, load_rows, to_pil
from granvit.eval.report import draw_boxes, update_scores
from granvit.gran_format import CHOICE_SUFFIX, VQA_SUFFIX
from granvit.grounding_granvit import box_scores, chosen_logprobs
from granvit.modeling_granvit import GranViTPreTrainedModel

MAX_NEW_TOKENS = {"region_caption": 32, "vqa": 16, "multiple_choice": 8, "ocr": 64}  # grounding: the box format's


# ----------------------------------------------------------------------------- model I/O

def load_model(model_id: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False):
    """``dtype="auto"``: ``GranViTPreTrainedModel.inference_dtype(device)`` (bf16 where the hardware runs it fast).

    GranViT checkpoints load with the installed package's classes. A checkpoint whose ``model_type`` neither
    transformers nor GranViT knows, and which ships its own code (``auto_map``), is refused unless
    ``trust_remote_code`` (running a repository's code is the caller's decision, never a default)."""
    config = PreTrainedConfig.get_config_dict(model_id)[0]
    if not trust_remote_code and config.get("model_type") not in CONFIG_MAPPING and config.get("auto_map"):
        raise UserError(
            f"{model_id} ships its own model code (model_type {config.get('model_type')!r}, which neither "
            "transformers nor GranViT provides); pass --trust-remote-code if you trust that repository"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = GranViTPreTrainedModel.inference_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=trust_remote_code, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def grounding_budget(processor) -> int:
    """New tokens for one grounding answer: one box of the checkpoint's box format and its eos (6 + 1 in the token
    format, ~16-21 + 1 in the text format)."""
    return processor.max_box_tokens + 1


def box_grammar(model, processor) -> LogitsProcessorList:
    """What `model.ground` decodes with: the box grammar, the answer starting with a box (or "not found" where the
    checkpoint learned it)."""
    return LogitsProcessorList([model.box_constraint(processor, force_box=True)])


@torch.inference_mode()
def generate(model, processor, images, prompts, max_new_tokens: int, logits_processor=None, return_logprobs=False,
             **generate_kwargs):
    """Greedy generation for a batch of (image, user prompt); returns the new token ids (batch, new_len) and, with
    `return_logprobs`, the log-probability of each under the scores it was picked from (batch, new_len)."""
    inputs = processor(images=images, text=prompts, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor,
                         output_scores=return_logprobs, return_dict_in_generate=True, **generate_kwargs)
    # Left padding: every prompt ends at the same column, so the answers start there.
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return (new, chosen_logprobs(out.scores, new)) if return_logprobs else new


# The instruction appended to a benchmark question per task type (lmms-eval's conventions for these benchmarks).
INSTRUCTIONS = {"vqa": VQA_SUFFIX, "multiple_choice": CHOICE_SUFFIX}


def build_prompt(processor, sample: dict, task_type: str, instruction: bool = True) -> str:
    """The user prompt for a canonical sample (eval/benchmarks.py): the one task -> prompt dispatch of the evaluation.

    ``instruction=False`` leaves out the task type's answer instruction (lmms-eval tasks bring their own)."""
    if task_type == "grounding":
        return processor.caption2bbox_prompt(sample["expression"])
    if task_type == "region_caption":
        return processor.bbox2caption_prompt(sample["box"], sample["image"].size)
    if task_type not in ("vqa", "multiple_choice", "ocr"):
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    options = "".join(f"\n{k}. {v}" for k, v in (sample.get("options") or {}).items() if v)
    return processor.vqa_prompt(sample["question"] + options + (INSTRUCTIONS.get(task_type, "") if instruction else ""))


def predict(model, processor, samples: list, task_type: str, max_new_tokens: int | None = None,
            unconstrained: bool = True) -> list:
    """Prediction records (JSON-ready) for one batch of canonical samples.

    Grounding: ``text`` / ``box`` / ``score`` (of that box) decoded under the box grammar (as ``model.ground``;
    ``box`` None for "not found"), and with ``unconstrained`` also ``text_unconstrained`` / ``box_unconstrained`` from
    plain greedy decoding."""
    images = [s["image"] for s in samples]
    prompts = [build_prompt(processor, s, task_type) for s in samples]
    if task_type == "grounding":
        max_new_tokens = max_new_tokens or grounding_budget(processor)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[task_type]

    grounding = task_type == "grounding"
    # Grounding passes its grammar explicitly (the plain answers must stay plain): generate adds none of its own.
    own = {"constrain_boxes": False} if grounding else {}

    def texts(logits_processor=None):
        new_ids = generate(model, processor, images, prompts, max_new_tokens, logits_processor, **own)
        return [t.strip() for t in processor.batch_decode(new_ids, skip_special_tokens=True)]

    def first_box(text, image):
        boxes = processor.post_process_grounding([text], [image.size])[0]
        return boxes[0] if boxes else None   # no box -> a miss, counted by grounding_scores

    if grounding:
        new_ids, logprobs = generate(model, processor, images, prompts, max_new_tokens, box_grammar(model, processor),
                                     return_logprobs=True, **own)
        answers = [t.strip() for t in processor.batch_decode(new_ids, skip_special_tokens=True)]
        scores = [(box_scores(processor, ids, lp) or [None])[0] for ids, lp in zip(new_ids.tolist(), logprobs.tolist())]
    else:
        answers, scores = texts(), [None] * len(samples)
    free = texts() if grounding and unconstrained else [None] * len(samples)
    records = []
    for s, text, score, free_text in zip(samples, answers, scores, free):
        rec = {"id": s["id"], "text": text, "target": {key: v for key, v in s.items() if key not in ("id", "image")}}
        rec["target"]["image_size"] = list(s["image"].size)
        if grounding:
            rec["box"], rec["score"] = first_box(text, s["image"]), score
            if free_text is not None:
                rec["text_unconstrained"], rec["box_unconstrained"] = free_text, first_box(free_text, s["image"])
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- scoring

def _score_grounding(recs):
    refs = [r["target"]["box"] for r in recs]
    out = M.grounding_scores([r["box"] for r in recs], refs, thresholds=(0.5, 0.75))
    out.update(score_stats(recs, refs))
    # Records written before unconstrained decoding was scored (a resumed run) have no unconstrained answer.
    if all("box_unconstrained" in r for r in recs):
        free = M.grounding_scores([r["box_unconstrained"] for r in recs], refs, thresholds=(0.5, 0.75))
        out.update({f"{k}_unconstrained": v for k, v in free.items() if k != "count"})
    return {"main": out["acc@0.5"], **out}


def score_stats(recs, refs) -> dict:
    """The box score's AUROC for correct (IoU >= 0.5) against wrong boxes (None without both kinds, or on records
    written before scores were kept), and the share of "not found" answers (no box)."""
    scored = [(r["score"], M.box_iou(r["box"], ref) >= 0.5) for r, ref in zip(recs, refs)
              if r.get("box") is not None and r.get("score") is not None and M.valid_box(r["box"])]
    auroc = M.auroc([s for s, _ in scored], [c for _, c in scored]) if scored else None
    return {"score_auroc": auroc, "not_found": sum(r.get("box") is None for r in recs) / len(recs)}


def _score_caption(recs):
    out = M.caption_scores([r["text"] for r in recs], [r["target"]["references"] for r in recs])
    return {"main": out["cider"], **out}


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _score_choice(recs, circular=False):
    out = M.choice_accuracy([r["text"] for r in recs], [r["target"]["options"] for r in recs],
                            [r["target"]["answer"] for r in recs])
    picks = out.pop("picks")
    if circular:
        correct = [p == r["target"]["answer"] for p, r in zip(picks, recs)]
        out["circular_accuracy"] = M.group_accuracy([r["target"]["group"] for r in recs], correct)
    return {"main": out["circular_accuracy"] if circular else out["accuracy"], **out}


def _score_yes_no(recs):
    out = M.yes_no_accuracy([r["text"] for r in recs], [r["target"]["answers"][0] for r in recs])
    correct = out.pop("correct")
    out["figure_accuracy"] = M.group_accuracy([r["target"]["subset"] for r in recs], correct)
    out["question_pair_accuracy"] = M.group_accuracy([r["target"]["group"] for r in recs], correct)
    return {"main": out["accuracy"], **out}


def _per_sample(fn, recs, **kw):
    return {"main": _mean(fn(r["text"], r["target"]["answers"], **kw) for r in recs), "count": len(recs)}


def _score_ocrbench(recs):
    scores = [M.ocrbench_score(r["text"], r["target"]["answers"], r["target"]["subset"]) for r in recs]
    return {"main": _mean(scores), "correct": int(sum(scores)), "count": len(recs)}


def _score_gqa(recs):
    hits = [M.vqa_normalize(r["text"]) == M.vqa_normalize(r["target"]["answers"][0]) for r in recs]
    return {"main": _mean(hits), "count": len(recs)}


SCORERS = {
    "grounding": _score_grounding,
    "caption": _score_caption,
    "choice": _score_choice,
    "circular_choice": lambda recs: _score_choice(recs, circular=True),
    "yes_no": _score_yes_no,
    "vqa_accuracy": lambda recs: _per_sample(M.vqa_accuracy, recs),
    "anls": lambda recs: _per_sample(M.anls, recs),
    "relaxed": lambda recs: _per_sample(M.relaxed_accuracy, recs),
    "ocrbench": _score_ocrbench,
    "gqa_exact": _score_gqa,
}


# ----------------------------------------------------------------------------- predictions file (resume)

def read_predictions(path: str) -> list:
    """Records already written; a truncated last line (a run killed mid-write) is dropped from the file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise ValueError(f"{path}: line {k + 1} is not JSON; delete the file to start over") from None
            print(f"dropping a truncated last line in {path}")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def run_benchmark(model, processor, name: str, output: str, data: str | None = None, limit: int | None = None,
                  batch_size: int = 8, config: str | None = None, max_new_tokens: int | None = None) -> dict:
    """Predict (resuming from <output>/<name>/predictions.jsonl), score, update scores.json and report.md."""
    bench = get_benchmark(name)
    bench_dir = os.path.join(output, name)
    os.makedirs(bench_dir, exist_ok=True)
    pred_path = os.path.join(bench_dir, "predictions.jsonl")
    done = {r["id"] for r in read_predictions(pred_path)}
    rows = load_rows(bench, data, config)
    base_dir = os.path.dirname(os.path.abspath(data)) if data else "."
    samples = iter_samples(bench, rows, base_dir)
    # A RefCOCO row holds several expressions: no sample count up front.
    total = limit if limit is not None else (None if bench.task_type == "grounding" else len(rows))
    with open(pred_path, "a", encoding="utf-8") as f, tqdm(total=total, desc=name) as bar:
        batch = []
        for n, sample in enumerate(samples):
            if limit is not None and n >= limit:
                break
            bar.update(1)
            if sample["id"] in done:
                continue
            batch.append(sample)
            if len(batch) == batch_size:
                _write(f, predict(model, processor, batch, bench.task_type, max_new_tokens))
                batch = []
        if batch:
            _write(f, predict(model, processor, batch, bench.task_type, max_new_tokens))
    records = read_predictions(pred_path)
    if limit is not None:
        records = records[:limit]
    scores = {"benchmark": name, "family": bench.family, "metric": bench.metric, "hub_id": bench.hub_id,
              "split": bench.split, "data": data, "in_average": bench.in_average, **SCORERS[bench.metric](records)}
    update_scores(output, name, scores)
    if bench.task_type == "grounding":
        draw_boxes(records, rows, bench, base_dir, bench_dir)
    return scores


def _write(f, records):
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.flush()


# ----------------------------------------------------------------------------- synthetic set

def _load_gran(dataset_or_path, split: str):
    if not isinstance(dataset_or_path, (str, os.PathLike)):
        return dataset_or_path
    path = str(dataset_or_path)
    if path.endswith(".parquet"):
        return load_dataset("parquet", data_files=path, split="train")
    return load_dataset(path, split=split)


def synthetic_baselines(train) -> tuple:
    """(mean training box normalised to [0, 1] xyxy, most common training caption) of a Gran train split
    (a `datasets.Dataset` or any iterable of Gran rows)."""
    boxes, captions = [], []
    # Only the box columns: a Dataset then skips decoding every training image.
    rows = train.select_columns(["width", "height", "regions"]) if hasattr(train, "select_columns") else train
    for row in rows:
        w, h = row["width"], row["height"]
        for region in row["regions"]:
            x1, y1, x2, y2 = region["bbox"]
            boxes.append([x1 / w, y1 / h, x2 / w, y2 / h])
            captions.append(region["caption"])
    if not boxes:
        raise ValueError("the train split has no regions to compute baselines from")
    return [sum(b[k] for b in boxes) / len(boxes) for k in range(4)], M.most_common(captions)


def evaluate_synthetic(model, processor, dataset_or_path, limit: int | None = None, batch_size: int = 16,
                       train=None, baseline_box=None, baseline_caption=None, split: str = "test",
                       unconstrained: bool = True, baselines: bool = True, caption_metrics: bool = False,
                       progress: bool = True) -> dict:
    """Caption->box grounding and box->caption scores on a Gran-schema set, with baselines.

    dataset_or_path: a `datasets.Dataset` in the Gran schema, a Gran dataset folder (its `split` is read) or
    a Parquet file. Every region of every image is one query (up to `limit` regions).
    Grounding (`grounding_acc50`, `grounding_miou`, `grounding_invalid`) decodes as `model.ground` does, under the box
    grammar, with the box score's AUROC for correct vs wrong boxes (`grounding_score_auroc`, None without both kinds)
    and the share of "not found" answers (`grounding_not_found`); with `unconstrained` the plain greedy answers are
    scored too (`grounding_*_unconstrained`: what the model writes on its own; a validation loop may skip them to save
    a third of the decoding).
    Baselines (`baselines=False` skips them): the mean training box (`baseline_box`, normalised [0, 1] xyxy, scaled to
    each image) and the most common training caption (`baseline_caption`); missing ones are computed from `train` (a
    Gran Dataset, or the "train" split of the same folder). `caption_metrics` adds BLEU / ROUGE-L / CIDEr-D of the
    region captions as `caption_<metric>` (pycocoevalcap, the `eval` extra; not METEOR, a Java process per call).
    """
    data = _load_gran(dataset_or_path, split)
    if baselines and (baseline_box is None or baseline_caption is None):
        if train is None:
            if not isinstance(dataset_or_path, (str, os.PathLike)) or str(dataset_or_path).endswith(".parquet"):
                raise ValueError("evaluate_synthetic needs `train` (or baseline_box and baseline_caption)")
            train = _load_gran(dataset_or_path, "train")
        box, caption = synthetic_baselines(_load_gran(train, "train"))
        baseline_box = box if baseline_box is None else baseline_box
        baseline_caption = caption if baseline_caption is None else baseline_caption

    queries = []   # (image, region) pairs, images decoded once per row
    for row in data:
        image = to_pil(row["image"])
        for region in row["regions"]:
            if limit is not None and len(queries) >= limit:
                break
            queries.append({"id": f"{row['image_id']}/{len(queries)}", "image": image,
                            "expression": region["caption"], "box": [float(v) for v in region["bbox"]],
                            "references": [region["caption"]]})
        if limit is not None and len(queries) >= limit:
            break
    if not queries:
        raise UserError(f"the {split} split of {dataset_or_path} has no regions to evaluate")

    grounded, pred_caps = [], []
    for start in tqdm(range(0, len(queries), batch_size), desc="synthetic eval", disable=not progress):
        batch = queries[start:start + batch_size]
        grounded += predict(model, processor, batch, "grounding", unconstrained=unconstrained)
        pred_caps += [r["text"] for r in predict(model, processor, batch, "region_caption")]

    refs = [q["box"] for q in queries]
    pred_boxes = [r["box"] for r in grounded]
    grounding = M.grounding_scores(pred_boxes, refs)
    captions = [q["expression"] for q in queries]
    stats = score_stats(grounded, refs)
    out = {
        "grounding_acc50": grounding["acc@0.5"],
        "grounding_miou": grounding["miou"],
        "grounding_invalid": grounding["invalid"],
        "grounding_score_auroc": stats["score_auroc"],
        "grounding_not_found": stats["not_found"],
        "caption_exact": M.exact_match(pred_caps, captions),
    }
    if unconstrained:
        free = M.grounding_scores([r["box_unconstrained"] for r in grounded], refs)
        out.update(grounding_acc50_unconstrained=free["acc@0.5"], grounding_miou_unconstrained=free["miou"],
                   grounding_invalid_unconstrained=free["invalid"])
    if caption_metrics:
        scores = M.caption_scores(pred_caps, [q["references"] for q in queries], meteor=False)
        out.update({f"caption_{k}": v for k, v in scores.items() if k not in ("count", "meteor_skipped")})
    if baselines:
        base_boxes = [[baseline_box[0] * w, baseline_box[1] * h, baseline_box[2] * w, baseline_box[3] * h]
                      for w, h in (q["image"].size for q in queries)]
        out.update(grounding_acc50_baseline=M.grounding_scores(base_boxes, refs)["acc@0.5"],
                   caption_exact_baseline=M.exact_match([baseline_caption] * len(captions), captions),
                   baseline_box=list(baseline_box), baseline_caption=baseline_caption)
    examples = [{"caption": c, "predicted_caption": p, "box": b, "predicted_box": r["box"]}
                for c, p, b, r in list(zip(captions, pred_caps, refs, grounded))[:5]]
    if unconstrained:
        for example, r in zip(examples, grounded):
            example["predicted_box_unconstrained"] = r["box_unconstrained"]
    out.update(num_regions=len(queries), num_images=len({q["id"].split("/")[0] for q in queries}), examples=examples)
    return out


def check_gran_data(data: str | None, split: str) -> list[str]:
    """`--benchmark gran`'s `--data`: a Gran folder that has `split` (returns its splits) or a Parquet file ([])."""
    if data is None:
        raise UserError("--benchmark gran needs --data: a Gran dataset folder (granvit-data synth/convert) or a "
                        "Parquet file of Gran rows")
    if not os.path.exists(data):
        raise UserError(f"--data {data}: no such folder or file; check the path")
    if not os.path.isdir(data):
        if not data.endswith(".parquet"):
            raise UserError(f"--data {data}: expected a Gran dataset folder or a .parquet file")
        return []
    try:
        splits = get_dataset_split_names(data)  # what load_dataset(data, split=...) will accept
    except EmptyDatasetError:
        raise UserError(f"--data {data} holds no data files; pass a Gran dataset folder") from None
    if split not in splits:
        raise UserError(f"--data {data} has no {split!r} split (it has {', '.join(splits)}); pass --split")
    return splits


def run_gran(model, processor, data: str, split: str, output: str, limit: int | None = None, batch_size: int = 8,
             baselines: bool = False) -> dict:
    """`--benchmark gran`: `evaluate_synthetic` on a local Gran folder's `split` or on a Parquet file (checked by
    `check_gran_data`), with BLEU / ROUGE-L / CIDEr-D for the region captions and, with `baselines`, the baselines
    from the folder's train split. Writes <output>/gran/result.json and the scalars into scores.json / report.md."""
    result = evaluate_synthetic(model, processor, data, limit=limit, batch_size=batch_size, split=split,
                                baselines=baselines, caption_metrics=True)
    bench_dir = os.path.join(output, "gran")
    os.makedirs(bench_dir, exist_ok=True)
    with open(os.path.join(bench_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    scores = {"benchmark": "gran", "family": "fine-grained", "metric": "grounding", "hub_id": None, "split": split,
              "data": data, "in_average": False, "main": result["grounding_acc50"], **scalars}
    update_scores(output, "gran", scores)
    return scores


# ----------------------------------------------------------------------------- CLI

@console_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--benchmark", required=True, choices=sorted([*BENCHMARKS, "gran"]),
                        help="gran: a local Gran split (--data DIR --split test): grounding and region captions")
    parser.add_argument("--data", help="local Parquet/JSONL with the benchmark's Hub columns (instead of the Hub); "
                                       "for gran, a Gran dataset folder or Parquet file")
    parser.add_argument("--split", help="gran: the split of the --data folder (default test)")
    parser.add_argument("--config", help="Hub config to use instead of the registry's (e.g. a BLINK sub-task)")
    parser.add_argument("--limit", type=int, help="score only the first N samples (gran: regions)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default: per task type")
    parser.add_argument("--output", default="eval_out")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bf16 on GPUs and on CPUs with AMX / AVX512-BF16, else float32")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint that is not GranViT to run the model code it ships (only for "
                             "repositories you trust; GranViT checkpoints never need it)")
    args = parser.parse_args(argv)
    gran = args.benchmark == "gran"
    if gran:  # checked before the model loads: a wrong path fails in a second
        split = args.split or "test"
        splits = check_gran_data(args.data, split)
    elif args.split:
        raise UserError(f"--split applies to --benchmark gran only; {args.benchmark} is scored on its registry split")
    elif args.data and not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file; check the path")

    model, processor = load_model(check_model_source(args.model, "--model"), args.device, args.dtype,
                                  args.trust_remote_code)
    if gran:
        baselines = "train" in splits and split != "train"
        scores = run_gran(model, processor, args.data, split, args.output, args.limit, args.batch_size, baselines)
    else:
        scores = run_benchmark(model, processor, args.benchmark, args.output, args.data, args.limit, args.batch_size,
                               args.config, args.max_new_tokens)
    print(json.dumps({k: v for k, v in scores.items() if not isinstance(v, (list, dict))}, indent=2))
    print(f"report: {os.path.join(args.output, 'report.md')}")


if __name__ == "__main__":
    sys.exit(main())
