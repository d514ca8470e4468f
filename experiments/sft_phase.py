"""The cost and effect of a short SFT phase (trl's SFTTrainer, train/configs/sft_quickstart.yaml) at the end of the
main job: wall time, and held-out scores before / after (grounding, region captions, the counting question).

    python -m granvit.experiments.sft_phase --start outputs/quickstart --steps 150

Writes <out>/sft_seed<N>.json (default out: experiments/results/sft).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ..eval.run import evaluate_synthetic, generate
from ..train.data.tasks import COUNT_QUESTION
from ..train.recipe import CONFIGS, load_recipe
from ..train.runner import RunState, load_checkpoint, load_split, make_trainer

DEFAULT_OUT = Path(__file__).parent / "results" / "sft"


def counting_accuracy(model, processor, test, batch_size: int = 64) -> float:
    """Exact match of the answer to "How many objects are in the image?" with the image's number of regions."""
    model.eval()
    rows = list(test)
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [processor.vqa_prompt(COUNT_QUESTION)] * len(batch)
        ids = generate(model, processor, [r["image"].convert("RGB") for r in batch], prompts, max_new_tokens=4)
        answers = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        correct += sum(a == str(len(r["regions"])) for a, r in zip(answers, batch))
    return correct / len(rows)


def scores(model, processor, test, limit) -> dict:
    model.eval()
    out = evaluate_synthetic(model, processor, test, limit=limit, batch_size=64, unconstrained=False, baselines=False,
                             progress=False)
    return {**{k: out[k] for k in ("grounding_acc50", "grounding_miou", "caption_exact", "num_regions")},
            "count_exact": counting_accuracy(model, processor, test)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--eval-limit", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = Path(args.start)
    recipe = load_recipe(CONFIGS / "sft_quickstart.yaml", [
        f"model.checkpoint={start / 'checkpoint'}", f"data.path={start / 'data'}", f"seed={args.seed}",
        f"phases.sft.training.max_steps={args.steps}", f"output_dir={tempfile.mkdtemp(prefix='granvit-sft-')}",
        "training.disable_tqdm=true"])
    test = load_split(start / "data", "test")
    model, processor = load_checkpoint(start / "checkpoint")
    before = scores(model, processor, test, args.eval_limit)
    torch.manual_seed(args.seed)
    trainer = make_trainer(recipe, "sft", model, processor, load_split(start / "data", "train"), RunState())
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    result = {"before": before, "after": scores(trainer.accelerator.unwrap_model(trainer.model), processor, test,
                                                args.eval_limit),
              "steps": trainer.state.global_step, "train_s": train_s, "s_per_step": train_s / trainer.state.global_step,
              "curve": [{k: e[k] for k in ("step", "loss", "mean_token_accuracy") if k in e}
                        for e in trainer.state.log_history if "loss" in e],
              "recipe": recipe, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sft_seed{args.seed}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("before", "after", "steps", "train_s")}, indent=1))
    return result


if __name__ == "__main__":
    main()
