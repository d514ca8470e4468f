"""Box scores and "not found": does a box's score tell right boxes from wrong ones, and does training on negatives
teach the model to refuse a phrase that names nothing in the image without costing grounding? (issue 23)

    python -m granvit.experiments.grounding_scores                           # both arms of the main job's recipe
    python -m granvit.experiments.grounding_scores --without outputs/quickstart/checkpoint \
        --data outputs/quickstart/data                                       # the main job's checkpoint as arm 1
    python -m granvit.experiments.grounding_scores --without A --with B --data DIR   # two trained checkpoints
    python -m granvit.experiments.grounding_scores --smoke --out /tmp/gs             # a few steps: the pipeline

Arms (same recipe, data, pretrained parts and seed): ``without``, the recipe as it is (the paper's Caption2Bbox, no
negatives), and ``with``, the same recipe with ``caption2bbox_negative: --negative-share`` added to every phase that
trains Caption2Bbox (train/data/tasks.py: an image is also asked, with that probability, for a caption of the
dataset that none of its regions has, answered "not found"). ``--without`` / ``--with`` take a trained checkpoint
instead of training that arm; ``--data`` is then the Gran folder it was trained on (default: the recipe's synthetic
set, written into <out>/data: the same images as the main job's, the generator being seeded).

Each arm is scored on the held-out ``test`` split, every region's caption a "present" phrase and, per image, one
"absent" phrase (a training caption that no region of the image has, seeded per image), all decoded as users decode
(``model.ground``: the box grammar, "not found" where the arm learned it):

    grounding_acc50           present phrases whose first box has IoU >= 0.5 with a region of that caption
    score_auroc               AUROC of the first box's score for right (IoU >= 0.5) vs wrong boxes (present phrases)
    present_vs_absent_auroc   AUROC of the score (0 for "not found") for present vs absent phrases
    not_found_absent / _present   share answered "not found" (the model's own answer, or no box scoring at least the
                              threshold) at the threshold chosen on the ``val`` split (max. absent minus present
                              refusals, Youden's J); ``model_not_found_*`` the same without a threshold
    grounding_acc50_at_threshold  present phrases still right once low-scoring boxes are dropped

Writes <out>/grounding_scores.json (both arms, ``acc50_change``: with minus without) and prints it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from ..box_utils_granvit import box_iou
from ..eval import metrics as M
from ..eval.benchmarks import to_pil
from ..grounding_granvit import NEGATIVE_TASK
from ..train.quickstart import CONFIG, SMOKE
from ..train.recipe import load_recipe
from ..train.runner import load_checkpoint, load_split, prepare_data, run

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "results" / "grounding_scores"
ARMS = ("without", "with")


def arm_recipe(config: str, arm: str, out: Path, data: Path, share: float, overrides: list[str]) -> dict:
    """The recipe of one arm: the shared data folder, its own output folder, and (``with``) the negatives share in
    every phase that trains Caption2Bbox."""
    recipe = load_recipe(config, overrides + [f"output_dir={out / arm}", f"data.path={data}"])
    if arm == "with":
        for phase in recipe["phases"].values():
            if "caption2bbox" in phase["tasks"]:
                phase["tasks"][NEGATIVE_TASK] = share
    return recipe


def caption_pool(train) -> list[str]:
    """Every caption of the training split, in first-seen order (the absent phrases are drawn from it)."""
    pool: dict[str, None] = {}
    for regions in train.select_columns(["regions"])["regions"]:
        for region in regions:
            pool.setdefault(region["caption"].strip())
    return list(pool)


@torch.no_grad()
def score_phrases(model, processor, split, pool: list[str], limit: int | None = None, seed: int = 0) -> list[dict]:
    """Per phrase {"image_id", "phrase", "present", "boxes", "scores", "iou"}: every region caption of each image
    (present; ``iou`` of the first box with the best region of that caption, 0 without a box) and one absent caption."""
    budget = max(processor.max_box_tokens, len(processor.not_found_ids)) + 1  # one box, or "not found", and its eos
    records = []
    for row in split.select(range(min(limit or len(split), len(split)))):
        image = to_pil(row["image"])
        truth: dict[str, list] = {}
        for region in row["regions"]:
            truth.setdefault(region["caption"].strip(), []).append([float(v) for v in region["bbox"]])
        candidates = [c for c in pool if c not in truth]
        absent = [random.Random(f"{seed}:{row['image_id']}").choice(candidates)] if candidates else []
        phrases = list(truth) + absent
        for phrase, found in zip(phrases, model.ground(processor, image, phrases, max_new_tokens=budget,
                                                       return_scores=True)):
            present = phrase in truth
            iou = max((box_iou(found["boxes"][0], t) for t in truth[phrase]), default=0.0) \
                if present and found["boxes"] else 0.0
            records.append({"image_id": row["image_id"], "phrase": phrase, "present": present, **found, "iou": iou})
    return records


def refused(record: dict, threshold: float) -> bool:
    """ "not found": the model's own answer (no box), or no box scoring at least ``threshold``."""
    return not any(score >= threshold for score in record["scores"])


def choose_threshold(records: list[dict]) -> float:
    """The threshold (0 or a first-box score) with the most absent minus present refusals; the lowest on ties."""
    present, absent = [r for r in records if r["present"]], [r for r in records if not r["present"]]
    if not present or not absent:
        return 0.0
    candidates = sorted({0.0} | {r["scores"][0] for r in records if r["scores"]})

    def youden(t):
        return statistics.mean(refused(r, t) for r in absent) - statistics.mean(refused(r, t) for r in present)

    return max(candidates, key=lambda t: (youden(t), -t))


def summarize(records: list[dict], threshold: float) -> dict:
    present, absent = [r for r in records if r["present"]], [r for r in records if not r["present"]]
    boxed = [r for r in present if r["boxes"]]

    def share(rows, fn):
        return float(statistics.mean(fn(r) for r in rows)) if rows else None

    return {
        "present_phrases": len(present),
        "absent_phrases": len(absent),
        "grounding_acc50": share(present, lambda r: r["iou"] >= 0.5),
        "score_auroc": M.auroc([r["scores"][0] for r in boxed], [r["iou"] >= 0.5 for r in boxed]) if boxed else None,
        "present_vs_absent_auroc": M.auroc([r["scores"][0] if r["scores"] else 0.0 for r in records],
                                           [r["present"] for r in records]),
        "threshold": threshold,
        "not_found_absent": share(absent, lambda r: refused(r, threshold)),
        "not_found_present": share(present, lambda r: refused(r, threshold)),
        "model_not_found_absent": share(absent, lambda r: not r["boxes"]),
        "model_not_found_present": share(present, lambda r: not r["boxes"]),
        "grounding_acc50_at_threshold": share(present, lambda r: r["iou"] >= 0.5 and not refused(r, threshold)),
    }


def evaluate_arm(model, processor, data: Path, recipe: dict, limit: int | None) -> dict:
    names = recipe["data"]["splits"]
    pool = caption_pool(load_split(data, names["train"]))
    model.eval()
    val = score_phrases(model, processor, load_split(data, names["val"]), pool, limit, recipe["seed"])
    threshold = choose_threshold(val)
    test = score_phrases(model, processor, load_split(data, names["test"]), pool, limit, recipe["seed"])
    return {"trained_tasks": list(model.config.trained_tasks or []), "val": summarize(val, threshold),
            "test": summarize(test, threshold), "examples": test[:6]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="the recipe both arms train (default: the main job's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--negative-share", type=float, default=0.2,
                        help="caption2bbox_negative share of the 'with' arm (per image: ~0.1 of its grounding queries "
                             "at the main job's ~1.9 regions per image)")
    parser.add_argument("--without", help="a trained checkpoint to use as the 'without' arm instead of training it")
    parser.add_argument("--with", dest="with_", help="a trained checkpoint to use as the 'with' arm")
    parser.add_argument("--data", help="the Gran folder the checkpoints were trained on (default: the recipe's "
                                       "synthetic set, written to <out>/data)")
    parser.add_argument("--limit", type=int, help="images per split scored (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the main job's --smoke sizes: checks the pipeline")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    overrides = (SMOKE if args.smoke else []) + [f"threads={args.threads}", "training.disable_tqdm=true"] + args.set
    data = Path(args.data) if args.data else prepare_data(load_recipe(args.config, overrides + [f"output_dir={out}"]))
    result = {"config": args.config, "overrides": overrides, "negative_share": args.negative_share, "data": str(data),
              "smoke": args.smoke, "arms": {}}
    for arm, checkpoint in zip(ARMS, (args.without, args.with_)):
        start = time.time()
        recipe = arm_recipe(args.config, arm, out, data, args.negative_share, overrides)
        if checkpoint:
            model, processor = load_checkpoint(checkpoint)
            source = {"checkpoint": checkpoint}
        else:
            print(f"=== training arm '{arm}' ({', '.join(recipe['phases'])})", flush=True)
            model, processor, state, _ = run(recipe)
            source = {"phases": {k: v["tasks"] for k, v in recipe["phases"].items()}, "timings": state.timings}
        scores = evaluate_arm(model, processor, data, recipe, args.limit)
        result["arms"][arm] = {**source, **scores, "seconds": time.time() - start}
        print(f"--- {arm}: " + json.dumps(scores["test"]), flush=True)
    acc = [result["arms"][arm]["test"]["grounding_acc50"] for arm in ARMS]
    result["acc50_change"] = None if None in acc else acc[1] - acc[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "grounding_scores.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({arm: result["arms"][arm]["test"] for arm in ARMS} | {"acc50_change": result["acc50_change"]},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
