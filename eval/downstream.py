"""Score a model on the synthetic downstream benchmarks (`granvit-data downstream`, train/data/downstream.py).

    from granvit.eval.downstream import evaluate_downstream
    result = evaluate_downstream(model, processor, "downstream-data", split="test")
    result["benchmarks"]["synth_count"]   # {"family": "vqa", "metric": "exact", "score": 0.62, "count": 50, ...}
    result["families"]                    # {"fine-grained": ..., "vqa": ..., "ocr": ...}: the paper's three averages

Each row is prompted by `downstream_prompt` (its `{boxN}` placeholders in the processor's box format), the same
prompt the rows train with, and decoded greedily in batches of one benchmark. Grounding rows decode under the box
grammar, as `model.ground` and `granvit-eval` do, so every answer holds a box. The answer budget of a benchmark is its
longest reference answer plus 2 tokens (a grounding answer: one box and its eos): a right answer always fits, and an
untrained model, which never stops by itself, costs a bounded time.

Scores (`score_predictions`, pure, per the row's `metric`): `grounding_acc50` ACC@IoU0.5 of the first predicted box
(plus mIoU and invalid answers); `exact` normalized exact match (`metrics.exact_match`); `anls` the DocVQA ANLS
(`metrics.anls`, threshold 0.5; exact match reported beside it); `choice` the option letter extracted as VLMEvalKit
does (`metrics.extract_choice`; unparsed answers counted). A family's average is the mean of its benchmarks' scores,
as in the paper's table.
"""
from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from granvit.eval import metrics as M
from granvit.eval.benchmarks import FAMILIES, to_pil
from granvit.eval.run import _load_gran, box_grammar, generate
from granvit.gran_format import LETTERS, PLACEHOLDER, downstream_prompt


def predict_rows(model, processor, rows: list[dict], batch_size: int = 16) -> list[dict]:
    """Greedy answers to rows of one benchmark: per row {"text"} and, for grounding, {"box"} (first box or None)."""
    grounding = rows[0]["metric"] == "grounding_acc50"
    if grounding:
        budget, logits_processor = processor.max_box_tokens + 1, box_grammar(model, processor)
    else:
        lengths = processor.tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
        budget, logits_processor = max(len(ids) for ids in lengths) + 2, None
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = [to_pil(r["image"]) for r in batch]
        new_ids = generate(model, processor, images, [downstream_prompt(processor, r) for r in batch], budget,
                           logits_processor)
        for row, text in zip(batch, processor.batch_decode(new_ids, skip_special_tokens=True)):
            record = {"text": text.strip()}
            if grounding:
                boxes = processor.decode_boxes(record["text"], (row["width"], row["height"]))
                record["box"] = boxes[0] if boxes else None  # no box: a miss, counted as invalid
            out.append(record)
    return out


def _options(row) -> dict:
    # An option that is a box placeholder can only be picked by its letter (its text is the checkpoint's box format).
    return {LETTERS[k]: "" if PLACEHOLDER.search(c) else c for k, c in enumerate(row["choices"])}


def score_benchmark(rows: list[dict], predictions: list[dict]) -> dict:
    """{"score", ...extras} of one benchmark's rows (all with the same metric) and their predictions."""
    metric = rows[0]["metric"]
    texts, answers = [p["text"] for p in predictions], [r["answer"] for r in rows]
    if metric == "grounding_acc50":
        out = M.grounding_scores([p.get("box") for p in predictions], [r["answer_boxes"][0] for r in rows])
        return {"score": out["acc@0.5"], "miou": out["miou"], "invalid": out["invalid"]}
    if metric == "exact":
        return {"score": M.exact_match(texts, answers)}
    if metric == "anls":
        return {"score": sum(M.anls(t, [a]) for t, a in zip(texts, answers)) / len(rows),
                "exact": M.exact_match(texts, answers)}
    if metric == "choice":
        out = M.choice_accuracy(texts, [_options(r) for r in rows], answers)
        return {"score": out["accuracy"], "unparsed": out["unparsed"]}
    raise ValueError(f"unknown metric {metric!r} of benchmark {rows[0]['benchmark']}")


def score_predictions(rows: list[dict], predictions: list[dict], examples: int = 3) -> dict:
    """Per-benchmark scores and the family averages of rows and their predictions (same order)."""
    if len(rows) != len(predictions) or not rows:
        raise ValueError(f"need equally many rows and predictions, got {len(rows)} / {len(predictions)}")
    groups = defaultdict(list)
    for row, pred in zip(rows, predictions):
        groups[row["benchmark"]].append((row, pred))
    benchmarks = {}
    for name, pairs in groups.items():
        bench_rows, preds = [r for r, _ in pairs], [p for _, p in pairs]
        benchmarks[name] = {
            "family": bench_rows[0]["family"], "metric": bench_rows[0]["metric"], **score_benchmark(bench_rows, preds),
            "count": len(pairs),
            "examples": [{"question": r["question"], "answer": r["answer"] or r["answer_boxes"], "prediction": p}
                         for r, p in pairs[:examples]],
        }
    families = {}
    for family in FAMILIES:
        scores = [b["score"] for b in benchmarks.values() if b["family"] == family]
        if scores:
            families[family] = sum(scores) / len(scores)
    return {"benchmarks": benchmarks, "families": families}


def evaluate_downstream(model, processor, dataset_or_path, split: str = "test", limit_per_benchmark: int | None = None,
                        batch_size: int = 16, progress: bool = True) -> dict:
    """Every benchmark of a downstream split (a folder written by `granvit-data downstream`, a Parquet file or a
    `datasets.Dataset` of downstream rows), up to `limit_per_benchmark` rows each: see `score_predictions`."""
    data = _load_gran(dataset_or_path, split)
    groups = defaultdict(list)
    for row in data:
        if limit_per_benchmark is None or len(groups[row["benchmark"]]) < limit_per_benchmark:
            groups[row["benchmark"]].append(row)
    if not groups:
        raise ValueError(f"the {split} split of {dataset_or_path} has no rows")
    rows, predictions = [], []
    for name, bench_rows in tqdm(groups.items(), desc="downstream eval", disable=not progress):
        rows += bench_rows
        predictions += predict_rows(model, processor, bench_rows, batch_size)
    return score_predictions(rows, predictions)
