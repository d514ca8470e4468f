"""Grounding refined by RL (the grpo stage) vs more supervised stage 2 for the same wall time, from the main job's
checkpoint, seeded: one JSON per run, then a summary and a plot.

    granvit-quickstart --out outputs/quickstart                          # the starting checkpoint and its data
    python -m granvit.experiments.grpo --start outputs/quickstart --seeds 0 1 2 3 4     # two runs at a time on 2 cores
    python -m granvit.experiments.grpo --start /tmp/qs --smoke --out /tmp/grpo-smoke      # the test preset (slow test)
    python -m granvit.experiments.grpo --summary-only                                  # summary.md + grpo.png again

Per seed, from the same checkpoint (`<start>/checkpoint`, trained on `<start>/data`):
    grpo    `--grpo-steps` steps of the grpo phase of train/configs/grpo_quickstart.yaml (Caption2Bbox prompts,
            `num_generations` samples each under the box grammar, reward = IoU with the true box, KL to the start)
    stage2  the main job's stage 2 (train/configs/quickstart.yaml: Caption2Bbox + Bbox2Caption, 8 images a step) at a
            constant learning rate, stopped once it has trained for as long (wall clock) as the seed's grpo run
Both are scored on the held-out test split (`--eval-split`) as users decode (`model.ground`'s box grammar):
grounding ACC@0.5, mIoU, and region-caption exact match (RL trains grounding only; does captioning suffer?). The start
is scored once. Results: <out>/start.json, <out>/runs/<arm>_seed<N>.json (the reward curve, KL, time per step),
<out>/summary.md, <out>/grpo.png. Both arms run through the one runner's `make_trainer` (train/runner.py).
The runs go `--jobs` at a time, one per core by default (experiments/schedule.py: a run's output in <its JSON>.log); a
seed's stage2 arm starts once its grpo arm has written its time. With two runs side by side each arm trains next to
another run most of the time, so the two arms of a seed see about the same load (`--jobs 1`: none, as before).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..eval.run import evaluate_synthetic
from ..train.quickstart import CONFIG as QUICKSTART
from ..train.recipe import CONFIGS, load_recipe, section
from ..train.runner import RunState, load_checkpoint, load_split, make_trainer
from .schedule import Job, add_arguments, check, run_jobs

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "results" / "grpo"
GRPO_RECIPE = CONFIGS / "grpo_quickstart.yaml"
ARMS = ("grpo", "stage2")
SCORES = ("grounding_acc50", "grounding_miou", "caption_exact")


class WallClock(TrainerCallback):
    """Training-loop time, from the first step's start to the last step's end (no set-up, no scoring); with `limit`,
    stops training once that many seconds have passed."""

    def __init__(self, limit: float | None = None):
        self.limit, self.start, self.elapsed = limit, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = self.start or time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed = time.time() - self.start
        if self.limit is not None and self.elapsed >= self.limit:
            control.should_training_stop = True


# ============================================================================================ recipes
def arm_recipe(arm: str, start: Path, seed: int, args) -> dict:
    """The recipe of one arm: the grpo phase of grpo_quickstart.yaml, or the quickstart's stage 2 at a constant lr."""
    common = [f"model.checkpoint={start / 'checkpoint'}", f"data.path={start / 'data'}", f"seed={seed}",
              f"threads={args.threads}", "training.save_strategy=\"no\"", "training.logging_steps=1",
              "training.disable_tqdm=true"]
    if arm == "grpo":
        recipe = load_recipe(GRPO_RECIPE, common + [f"phases.grpo.training.max_steps={args.grpo_steps}",
                                                    f"phases.grpo.training.learning_rate={args.grpo_lr:.6e}", *args.grpo_set])
    else:
        recipe = load_recipe(QUICKSTART, common + ["data.synth=null", "data.sizes=null",
                                                   "phases.stage2.training.max_steps=100000",
                                                   f"phases.stage2.training.learning_rate={args.stage2_lr:.6e}",
                                                   "phases.stage2.training.lr_scheduler_type=constant",
                                                   "phases.stage2.training.warmup_steps=0"])
        recipe["phases"] = {"stage2": recipe["phases"]["stage2"]}
    recipe["eval"] = section("eval")  # no validation
    return recipe


# ============================================================================================ one run
def score(model, processor, test, limit) -> dict:
    model.eval()
    scores = evaluate_synthetic(model, processor, test, limit=limit, batch_size=64, unconstrained=False,
                                baselines=False, progress=False)
    return {k: scores[k] for k in (*SCORES, "num_regions")}


def run_arm(arm: str, recipe: dict, timed_by: Path | None, split: str, limit, smoke: bool) -> dict:
    """Train one arm from the checkpoint and score it; returns the run's JSON (a job of experiments/schedule.py).
    stage2 trains for as long as the training loop of the grpo run whose JSON is `timed_by`."""
    seconds = json.loads(timed_by.read_text())["train_s"] if timed_by else None
    data = Path(recipe["data"]["path"])
    with tempfile.TemporaryDirectory(prefix=f"granvit-grpo-{arm}-") as work:
        recipe = copy.deepcopy(recipe)
        recipe["output_dir"] = work
        torch.manual_seed(recipe["seed"])
        model, processor = load_checkpoint(recipe["model"]["checkpoint"])
        trainer = make_trainer(recipe, arm, model, processor, load_split(data, "train"), RunState())
        clock = WallClock(seconds)
        trainer.add_callback(clock)
        trainer.train()
        train_s = clock.elapsed
        model = trainer.accelerator.unwrap_model(trainer.model)
    steps = trainer.state.global_step
    history = trainer.state.log_history
    curve = [{k: e[k] for k in ("step", "loss", "reward", "reward_std", "kl", "step_time") if k in e}
             for e in history if "loss" in e]
    t0 = time.time()
    scores = score(model, processor, load_split(data, split), limit)
    return {"arm": arm, "seed": recipe["seed"], "scores": scores, "steps": steps, "train_s": train_s,
            "s_per_step": train_s / max(steps, 1), "eval_s": time.time() - t0, "curve": curve, "recipe": recipe,
            "smoke": smoke, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def score_start(checkpoint: Path, data: Path, split: str, limit) -> dict:
    """The starting checkpoint's scores (a job, beside the first runs)."""
    model, processor = load_checkpoint(checkpoint)
    return {**score(model, processor, load_split(data, split), limit), "checkpoint": str(checkpoint)}


# ============================================================================================ summary
def summarize(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    start = json.loads((out / "start.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in (json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")))}
    seeds = sorted({s for a, s in runs if (("grpo", s) in runs and ("stage2", s) in runs)})
    lines = [f"# Grounding by RL vs more stage 2 (same wall time), seeds {seeds}", "",
             f"start: ACC@0.5 {start['grounding_acc50']:.3f}, mIoU {start['grounding_miou']:.3f}, caption exact "
             f"{start['caption_exact']:.3f} ({start['num_regions']} held-out regions)", "",
             "| arm | ACC@0.5 | mIoU | caption exact | steps | train s | s / step |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rows = [runs[(arm, s)] for s in seeds]
        cell = lambda vals: f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"  # noqa: E731
        lines.append(f"| {arm} | " + " | ".join(cell([r["scores"][k] for r in rows]) for k in SCORES)
                     + f" | {cell([r['steps'] for r in rows])} | {cell([r['train_s'] for r in rows])} | "
                     f"{cell([r['s_per_step'] for r in rows])} |")
    lines += ["", "| paired (grpo − stage2) | mean | per seed | paired t-test p |", "|---|---|---|---|"]
    for key in SCORES:
        diffs = [runs[("grpo", s)]["scores"][key] - runs[("stage2", s)]["scores"][key] for s in seeds]
        p = stats.ttest_rel([runs[("grpo", s)]["scores"][key] for s in seeds],
                            [runs[("stage2", s)]["scores"][key] for s in seeds]).pvalue if len(seeds) > 1 else float("nan")
        lines.append(f"| {key} | {np.mean(diffs):+.3f} | {', '.join(f'{d:+.3f}' for d in diffs)} | {p:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    window = 10
    rewards = []
    for s in seeds:
        curve = [e for e in runs[("grpo", s)]["curve"] if "reward" in e]
        left.plot([e["step"] for e in curve], [e["reward"] for e in curve], alpha=0.25, linewidth=0.8, label=f"seed {s}")
        rewards.append([e["reward"] for e in curve])
    length = min(len(r) for r in rewards)
    window = min(window, length)
    mean = np.convolve(np.mean([r[:length] for r in rewards], axis=0), np.ones(window) / window, mode="valid")
    left.plot(np.arange(window, length + 1), mean, color="black", linewidth=2, label=f"mean of seeds, {window}-step mean")
    left.set(xlabel="GRPO step", ylabel="mean IoU of the step's samples (reward)", title="reward per step")
    left.legend(fontsize=7)
    for s in seeds:
        right.plot([0, 1, 2], [start["grounding_acc50"], *(runs[(arm, s)]["scores"]["grounding_acc50"] for arm in ARMS)],
                   marker="o", alpha=0.6, label=f"seed {s}")
    right.set_xticks([0, 1, 2], ["start", "+ grpo", "+ stage 2 (same time)"])
    right.set(ylabel="held-out ACC@0.5 (box grammar)", title="grounding after the same wall time")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grpo.png", dpi=120)
    return "\n".join(lines)


# ============================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", default="outputs/quickstart", help="a granvit-quickstart output: checkpoint/, data/")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--grpo-lr", type=float, default=1e-5)
    parser.add_argument("--stage2-lr", type=float, default=1e-5)
    parser.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE", help="grpo recipe override")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-limit", type=int, help="score only the first N regions (default: all)")
    parser.add_argument("--smoke", action="store_true", help="2 GRPO steps, 16 regions scored: the test preset")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summary_only:
        return summarize(out)
    if args.smoke:
        args.grpo_steps, args.eval_limit = 2, 16
        args.grpo_set += ["phases.grpo.training.per_device_train_batch_size=4", "phases.grpo.training.num_generations=4"]
    start_dir = Path(args.start)
    evaluation = (args.eval_split, args.eval_limit, args.smoke)
    jobs = [Job("start", out / "start.json", score_start,
                (start_dir / "checkpoint", start_dir / "data", args.eval_split, args.eval_limit))]
    for seed in args.seeds:  # seed-major: a cut-short session still has paired runs
        grpo = out / "runs" / f"grpo_seed{seed}.json"
        jobs += [Job(f"grpo seed {seed}", grpo, run_arm,
                     ("grpo", arm_recipe("grpo", start_dir, seed, args), None, *evaluation)),
                 Job(f"stage2 seed {seed}", out / "runs" / f"stage2_seed{seed}.json", run_arm,
                     ("stage2", arm_recipe("stage2", start_dir, seed, args), grpo, *evaluation), after=(grpo,))]

    def line(result: dict) -> str:
        done = f"{result['steps']} steps in {result['train_s']:.0f} s, " if "steps" in result else ""
        return done + ", ".join(f"{k} {result[k] if k in result else result['scores'][k]:.3f}" for k in SCORES)

    failed = run_jobs(jobs, args.jobs, args.threads, args.force, line=line)
    summary = ""
    paired = [seed for seed in args.seeds if all((out / "runs" / f"{arm}_seed{seed}.json").exists() for arm in ARMS)]
    if (out / "start.json").exists() and paired:
        summary = summarize(out)
        print(summary)
    check(failed)
    return summary


if __name__ == "__main__":
    main()
