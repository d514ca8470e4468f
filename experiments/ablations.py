"""The paper's three ablations at tiny scale on the synthetic set, seeded: one JSON per run, then a summary.

    python -m granvit.experiments.ablations --claim stages distill --seeds 0 1 2     # ~3 min a run, 1 thread
    python -m granvit.experiments.ablations --claim data --seeds 0 1 2
    python -m granvit.experiments.ablations --claim stages distill --scale long --out experiments/results/long \
        --data-root outputs/experiments-data                                      # 2x the steps, ~3.5 min a run
    python -m granvit.experiments.ablations --claim stages distill data --seeds 0 --smoke --out /tmp/abl  # < 1 min
    python -m granvit.experiments.aggregate                                           # table + plots only

Claims (conditions in experiments/configs/ablations.yaml):
    stages   staged (warm-up -> stage 1 -> stage 2) vs joint training of every part for the same total steps
    distill  stage-1 self-distillation lambda = 1 vs lambda = 0, scored also by a linear probe of region features
    data     three training-set sizes, same steps

Each run is the main job's recipe (train/quickstart.py: data, tiny model, phases, evaluation) at a smaller scale;
this file only chooses the overrides, runs the phases and scores. Results: <out>/runs/<claim>/<condition>_seed<N>.json
(a finished run is skipped unless --force), then `aggregate` writes <out>/summary.md and one PNG per claim.
Seeds change the model initialisation and the batch order; the synthetic data are the same for every seed (data seed
0), and a smaller training set is a prefix of the larger one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ..eval.run import evaluate_synthetic, synthetic_baselines
from ..train.quickstart import (
    CONFIG, Phase, QueryStore, Recipe, build_model, load_recipe, load_split, make_data, run_phase, synth_config,
)
from .probe import linear_probe

HERE = Path(__file__).parent
REPO = HERE.parent
EXPERIMENTS_CONFIG = HERE / "configs" / "ablations.yaml"
DEFAULT_OUT = HERE / "results"
PROBE_TRAIN_IMAGES = 400  # the first 400 images of the shared training split (~760 regions) fit every probe
SCORE_KEYS = ("grounding_acc50", "grounding_acc50_baseline", "grounding_miou", "caption_exact", "caption_exact_baseline",
              "num_regions", "num_images")


# ============================================================================================ recipe per run
def load_plan(smoke: bool, scale: str = "full", path: Path = EXPERIMENTS_CONFIG) -> tuple[dict, dict]:
    """(scale overrides, {claim: {condition: overrides}}) for a scale preset, or the smoke preset."""
    plan = yaml.safe_load(path.read_text())
    claims = dict(plan["claims"])
    if smoke:
        claims.update(plan.get("smoke_claims", {}))
    return plan["scale"]["smoke" if smoke else scale], claims


def make_recipe(scale: dict, condition: dict, seed: int, config: str | Path = CONFIG, extra: list[str] = ()) -> Recipe:
    """The quickstart recipe + scale + condition overrides, with this run's seed."""
    condition = dict(condition)
    joint = condition.pop("joint", False)
    # JSON is valid YAML, so every value goes through load_recipe's own parser unchanged.
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**scale, **condition, "seed": seed}.items()] + list(extra)
    r = load_recipe(config, overrides)
    if joint:
        r = jointly(r)
    return r


def jointly(r: Recipe) -> Recipe:
    """All warm-up + stage-1 + stage-2 steps in one phase that trains every part on both tasks (the warm-up phase)."""
    if r.warmup_trains != "all":
        raise ValueError(f"joint training needs warmup_trains='all' (the phase that trains every part), got {r.warmup_trains!r}")
    total = sum(p.steps for p in r.phases().values())
    warmup = dataclasses.replace(r.warmup, steps=total, bbox2caption=1.0, caption2bbox=1.0)
    return dataclasses.replace(r, warmup=warmup, stage1=Phase(steps=0), stage2=Phase(steps=0))


# ============================================================================================ one run
def run_one(r: Recipe, data_dir: Path, work: Path, eval_after_stage1: bool = False, eval_batch_size: int = 64) -> dict:
    """Train one model with recipe `r` on the first `r.train_images` images of `data_dir` and score it."""
    start = time.time()
    torch.manual_seed(r.seed)
    full_train = load_split(data_dir, "train")
    if r.train_images > len(full_train):
        raise ValueError(f"{data_dir} holds {len(full_train)} training images, the run needs {r.train_images}")
    train = full_train.select(range(r.train_images))
    test = load_split(data_dir, "test")
    # The probe is fit on the same training-split images in every run, whatever the model was trained on: with a
    # smaller training set it would otherwise also get a smaller probe set and confound the data-size claim.
    probe_train = full_train.select(range(min(PROBE_TRAIN_IMAGES, len(full_train))))

    captions = [reg["caption"] for row in train.select_columns(["regions"]) for reg in row["regions"]]
    model, processor = build_model(r, work, captions)
    model.to(r.device)
    # Crops are needed by stage 1 even with lambda = 0: the stage-1 collator always sends them (and the trainer
    # pops them), so build them whenever stage 1 runs.
    store = QueryStore(train, processor, crops=r.stage1.steps > 0)
    baseline_box, baseline_caption = synthetic_baselines(train)
    timings = {"setup_s": time.time() - start}

    def evaluate() -> dict:
        t0 = time.time()
        model.eval()
        scores = evaluate_synthetic(model, processor, test, batch_size=eval_batch_size, baseline_box=baseline_box,
                                    baseline_caption=baseline_caption)
        timings["eval_s"] = timings.get("eval_s", 0.0) + time.time() - t0
        return {k: scores[k] for k in SCORE_KEYS}

    result = {"probe_init": linear_probe(model, processor, probe_train, test, r.roi_output_size, seed=r.seed)}
    curve = {"loss": [], "val": []}
    step = 0
    for name in ("warmup", "stage1", "stage2"):
        t0 = time.time()
        if r.phases()[name].steps > 0:
            step = run_phase(name, model, processor, store, r, work, step, curve, None)
        timings[f"{name}_s"] = time.time() - t0
        if name == "stage1" and eval_after_stage1 and r.stage1.steps > 0:
            result["after_stage1"] = evaluate()  # the paper's "stage 1 only" grounding (its ~13% vs ~55%)
    result["scores"] = evaluate()
    result["probe"] = linear_probe(model, processor, probe_train, test, r.roi_output_size, seed=r.seed)
    timings["total_s"] = time.time() - start
    result.update(timings=timings, steps=step, curve=curve["loss"])
    return result


def find_same_run(out: Path, r: Recipe, smoke: bool, needs_stage1_eval: bool) -> Path | None:
    """A finished, not itself reused, run of exactly this recipe (seed included) under `out`, if any."""
    recipe = dataclasses.asdict(r)
    for path in sorted((out / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        if run.get("reused_from") or run.get("smoke") != smoke or run.get("recipe") != json.loads(json.dumps(recipe)):
            continue
        if needs_stage1_eval and "after_stage1" not in run:
            continue
        return path
    return None


def data_dir_for(r: Recipe, max_train_images: int, root: Path) -> Path:
    """The shared synthetic set (data seed 0) large enough for every run of the plan; written once."""
    data_recipe = dataclasses.replace(r, train_images=max_train_images, seed=0)
    # The folder name carries a digest of the generator settings: a recipe change never reuses a stale set.
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(synth_config(data_recipe)), sort_keys=True).encode()).hexdigest()[:8]
    data_dir = root / f"synth-train{max_train_images}-val{r.val_images}-test{r.test_images}-{digest}"
    make_data(data_recipe, data_dir)
    return data_dir


# ============================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claim", nargs="+", required=True, choices=("stages", "distill", "data"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few images (the test preset)")
    parser.add_argument("--scale", default="full", choices=("full", "long"), help="scale preset (ablations.yaml)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (runs/, summary.md, PNGs)")
    parser.add_argument("--data-root", help="where the synthetic set is cached (default: <out>/data)")
    # 1 thread: on the shared 2 cores, 2 OpenMP threads per process were up to 8x slower (quickstart.yaml's note);
    # use the second core for a second invocation (another claim or --conditions) instead.
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every run (recorded in each JSON)")
    parser.add_argument("--conditions", nargs="+", help="run only these conditions of the claims (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists (and reuse no stored run)")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    scale, claims = load_plan(args.smoke, args.scale)
    # Default results folder -> data under outputs/ (git-ignored); any other --out keeps its data inside it.
    default_root = REPO / "outputs" / "experiments-data" if out.resolve() == DEFAULT_OUT.resolve() else out / "data"
    data_root = Path(args.data_root) if args.data_root else default_root

    # seed-major: every condition of seed 0 runs before seed 1, so a cut-short session still has paired comparisons
    plan = [(claim, name, cond, seed) for claim in args.claim for seed in args.seeds for name, cond in claims[claim].items()
            if not args.conditions or name in args.conditions]
    if not plan:
        raise SystemExit(f"no condition of {args.claim} is named in --conditions {args.conditions}")
    recipes = [make_recipe(scale, cond, seed, extra=args.set) for _, _, cond, seed in plan]
    # One synthetic set for every claim of the preset (sized for the largest), so separate invocations share it.
    max_train = max(make_recipe(scale, cond, 0, extra=args.set).train_images for conds in claims.values() for cond in conds.values())
    written = []
    for (claim, name, _, seed), r in zip(plan, recipes):
        path = out / "runs" / claim / f"{name}_seed{seed}.json"
        if path.exists() and not args.force:
            print(f"skip {path} (exists; --force reruns it)", flush=True)
            written.append(path)
            continue
        wants_stage1_eval = claim == "stages"
        # --force means "compute again": never substitute a stored run (the old JSON of this very path included)
        source = None if args.force else find_same_run(out, r, args.smoke, wants_stage1_eval)
        if source is not None:
            # e.g. distill/lambda1 and data/n1000 are the staged recipe itself: the same seeded run, not rerun.
            result = json.loads(source.read_text())
            result["reused_from"] = str(source.relative_to(out))
            print(f"=== {claim}/{name} seed {seed}: same recipe as {result['reused_from']}, reused", flush=True)
        else:
            print(f"=== {claim}/{name} seed {seed}", flush=True)
            data_dir = data_dir_for(r, max_train, data_root)
            with tempfile.TemporaryDirectory(prefix="granvit-ablation-") as work:
                result = run_one(r, data_dir, Path(work), eval_after_stage1=wants_stage1_eval)
            result.update(smoke=args.smoke, threads=args.threads, recipe=dataclasses.asdict(r),
                          finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        result.update(claim=claim, condition=name, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        written.append(path)
        print(f"--- {claim}/{name} seed {seed}: " + json.dumps(
            {**{k: result["scores"][k] for k in ("grounding_acc50", "caption_exact")},
             **{k: result["probe"][k] for k in ("probe_shape_acc", "probe_colour_acc")},
             "total_s": round(result["timings"]["total_s"], 1)}), flush=True)

    from .aggregate import aggregate

    aggregate(out)
    return written


if __name__ == "__main__":
    main()
