"""`granvit-quickstart`: the paper's pipeline end to end on small pretrained parts, on a 2-core CPU.

    granvit-quickstart                                        # outputs/quickstart (recipe: train/configs/quickstart.yaml)
    granvit-quickstart --smoke --out /tmp/qs                  # < 1 min: tiny sizes and a few steps (the test)
    granvit-quickstart --step-scale 0.5                       # every phase's (and part's) steps halved
    granvit-quickstart --set phases.stage2.training.max_steps=2000 --set model.box_format=tokens
    granvit-quickstart --set training.use_cpu=false --set threads=0                      # one GPU

What it runs, in order (the recipe's `phases` are the paper's two stages; nothing trains every part at once):
  1. the synthetic Gran set (train/val/test shards, train/data/synth.py);
  2. the pretrained parts (train/parts.py, cached by recipe hash): a small SigLIP trained with the sigmoid
     image-text loss on whole-image captions, and a small causal LM trained on text; their quality figures are printed;
  3. granvit-build's code path composes them (the same `from_pretrained` calls as a SigLIP 2 + Qwen2.5 build);
  4. stage 1: LLM frozen, ViT + projector on Bbox2Caption + self-distillation from the EMA teacher;
  5. stage 2: ViT frozen, projector + LLM on Caption2Bbox + Bbox2Caption;
  6. held-out test evaluation as users decode (`model.ground`'s box grammar; the free decoding is scored too), a
     checkpoint with demo examples, `scores.json`, `loss_curve.png` and `boxes.png`.
`granvit-train --stage 1` then `--stage 2` with the same recipe runs steps 1-5 through the same runner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..console import console_main
from .recipe import CONFIGS, dump_recipe, load_recipe
from .launch import die_with_parent, is_main_process, is_worker, planned_processes, relaunch
from .parts.shipped import CURVES
from .runner import load_split, own_parts_first, run

CONFIG = CONFIGS / "quickstart.yaml"
# --smoke: the same pipeline on a few images and steps, small enough for the test suite.
SMOKE = [
    "data.sizes.train=16", "data.sizes.val=4", "data.sizes.test=4",
    "phases.stage1.training.max_steps=2", "phases.stage2.training.max_steps=2", "training.per_device_train_batch_size=4",
    "eval.every=0", "eval.test_regions=8", "training.logging_steps=1",
]
SCORE_KEYS = ("grounding_acc50", "grounding_acc50_baseline", "caption_exact", "caption_exact_baseline", "grounding_miou",
              "grounding_invalid", "grounding_acc50_unconstrained", "grounding_miou_unconstrained",
              "grounding_invalid_unconstrained", "num_regions", "num_images")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/quickstart", help="output folder (checkpoint, scores, plots)")
    parser.add_argument("--config", default=str(CONFIG), help="recipe YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--step-scale", type=float, help="multiply every phase's and part's number of steps")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (< 1 min): the test preset")
    return parser.parse_args(argv)


def scale_steps(recipe: dict, factor: float) -> None:
    """Every phase's max_steps and every embedded part's steps times `factor` (at least 1)."""
    for phase in recipe["phases"].values():
        training = phase["training"]
        steps = training.get("max_steps", recipe["training"].get("max_steps"))
        if steps:
            training["max_steps"] = max(1, round(steps * factor))
    for part in (recipe["parts"] or {}).values():
        if part.get("steps"):
            part["steps"] = max(1, round(part["steps"] * factor))


def run_quickstart(argv=None) -> dict:
    """The whole job; returns what it writes to scores.json."""
    from ..eval.run import evaluate_synthetic, synthetic_baselines
    from ..spaces.demo_examples import write_demo_examples
    from .build import save_granvit
    from .report import plot_boxes, plot_curve

    args = parse_args(argv)
    start = time.time()
    recipe = load_recipe(args.config, (SMOKE if args.smoke else []) + [f"output_dir={args.out}"] + args.set)
    if args.step_scale:
        scale_steps(recipe, args.step_scale)
    out = Path(recipe["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if not is_main_process():  # the other data-parallel workers only train: rank 0 logs and writes
        run(recipe, log=lambda *args, **kwargs: None)
        return None
    dump_recipe(recipe, out / "recipe.yaml")  # the effective recipe: `granvit-push` puts it in the model card

    print(f"GranViT quickstart -> {out}  (phases: {', '.join(recipe['phases'])})", flush=True)
    model, processor, state, folder = run(recipe)

    print("[test] held-out evaluation, checkpoint, plots", flush=True)
    t0 = time.time()
    split = recipe["data"]["splits"]
    train, test = load_split(folder, split["train"]), load_split(folder, split["test"])
    model.eval()
    scores = evaluate_synthetic(model, processor, test, limit=recipe["eval"]["test_regions"], batch_size=64,
                                train=train)
    state.timings["eval_s"] = time.time() - t0
    checkpoint = save_granvit(model, processor, out / "checkpoint")
    write_demo_examples(checkpoint, test)
    plot_curve(state.curve, out / "loss_curve.png")
    plot_boxes(model, processor, test, out / "boxes.png")
    state.timings["total_s"] = time.time() - start
    result = {k: scores[k] for k in SCORE_KEYS}
    result.update(
        stages=state.phase_scores, parts={k: {m: v for m, v in r.items() if m not in CURVES} for k, r in state.parts.items()},
        skipped=state.skipped, timings=state.timings, load_average=os.getloadavg(), threads=torch.get_num_threads(),
        examples=scores["examples"], curve=state.curve, recipe=recipe,
    )
    (out / "scores.json").write_text(json.dumps(result, indent=2))

    print(f"\nheld-out test ({result['num_regions']} regions of {result['num_images']} images), decoded as "
          "model.ground decodes:")
    print(f"  grounding ACC@0.5   {result['grounding_acc50']:.3f}   (mean-box baseline "
          f"{result['grounding_acc50_baseline']:.3f}; free decoding {result['grounding_acc50_unconstrained']:.3f})")
    print(f"  caption exact match {result['caption_exact']:.3f}   (most-common-caption baseline "
          f"{result['caption_exact_baseline']:.3f})")
    for name, phase in state.phase_scores.items():
        print(f"  validation after {name:<8} grounding {phase['grounding_acc50']:.3f}  caption {phase['caption_exact']:.3f}")
    print(f"time: {state.timings['total_s'] / 60:.1f} min ({state.steps} optimizer steps); outputs in {out}/ "
          "(scores.json, loss_curve.png, boxes.png)")
    print(f"checkpoint: {checkpoint}\nopen the demo:  GRANVIT_MODEL={checkpoint} python spaces/app.py")
    return result


@console_main
def main(argv=None) -> int | None:
    args = parse_args(argv)
    recipe = load_recipe(args.config, (SMOKE if args.smoke else []) + args.set)
    processes = planned_processes(recipe)
    if processes > 1 and not is_worker():  # one worker per core; each runs this same command
        own_parts_first(recipe)
        return relaunch("granvit.train.quickstart", list(argv if argv is not None else sys.argv[1:]), recipe, processes)
    if is_worker():
        die_with_parent()
    run_quickstart(argv)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
