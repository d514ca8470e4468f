"""The paper's three ablations at tiny scale on the synthetic set, seeded: one JSON per run, then a summary.

    python -m granvit.experiments.ablations --claim stages distill data --seeds 0 1 2   # every run, one per core
    python -m granvit.experiments.ablations --claim stages distill data --seeds 0 --smoke --out /tmp/abl  # < 2 min
    python -m granvit.experiments.aggregate                                           # table + plots only

Claims (conditions in experiments/configs/ablations.yaml):
    stages   the paper's stage 1 -> stage 2 vs one phase training every part jointly for the same total steps
    distill  stage-1 self-distillation lambda = 1 vs lambda = 0, scored also by a linear probe of region features
    data     three training-set sizes, same steps
    noise    the paper's open question 2: the training regions as a data engine's detector + captioner give them
             (data.annotation_noise, train/data/noise.py), scored on the true held-out regions
    balance  the paper's open question 3: staged vs one joint phase vs one joint phase with the two tasks' gradients
             balanced by PCGrad (training.gradient_balance), same steps

Each run is the main job's recipe (train/configs/quickstart.yaml) + the preset's scale overrides + the condition's
overrides, trained by the one runner (train/runner.py); this file only chooses the overrides, probes and scores.
The runs go `--jobs` at a time, one per core by default (experiments/schedule.py: a run's output in <its JSON>.log).
Results (default <out>: experiments/results/claims_pipeline): <out>/runs/<claim>/<condition>_seed<N>.json (a finished
run is skipped unless --force), then `aggregate` writes <out>/summary.md and one PNG per claim. Seeds change the
GranViT initialisation (projector, new rows) and the batch order; the shipped pretrained parts and the
synthetic data (data seed 0) are the same for every seed, as a paper's runs share one SigLIP and one LLM, and a smaller
training set is a prefix of the larger one.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from ..eval.run import evaluate_synthetic
from ..train.quickstart import CONFIG, SMOKE
from ..train.fields import set_dotted
from ..train.recipe import load_recipe
from ..train.runner import RunState, build_model, load_split, run
from ..eval.probe import linear_probe
from .schedule import Job, add_arguments, check, run_jobs

HERE = Path(__file__).parent
REPO = HERE.parent
EXPERIMENTS_CONFIG = HERE / "configs" / "ablations.yaml"
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "claims_pipeline"  # results/runs/ etc. hold the previous pipeline's runs (EXPERIMENTS.md section 6)
PROBE_TRAIN_IMAGES = 400  # the first 400 images of the shared training split (~760 regions) fit every probe
SCORE_KEYS = ("grounding_acc50", "grounding_acc50_baseline", "grounding_miou", "caption_exact", "caption_exact_baseline",
              "grounding_acc50_unconstrained", "num_regions", "num_images")


# ============================================================================================ recipe per run
def load_plan(smoke: bool, scale: str = "full", path: Path = EXPERIMENTS_CONFIG) -> tuple[list[str], dict]:
    """(scale overrides, {claim: {condition: overrides}}) for a scale preset, or the smoke preset."""
    plan = yaml.safe_load(path.read_text())
    claims = dict(plan["claims"])
    if smoke:
        claims.update(plan.get("smoke_claims", {}))
        return list(SMOKE) + [f"{k}={json.dumps(v)}" for k, v in (plan["scale"].get("smoke") or {}).items()], claims
    return [f"{k}={json.dumps(v)}" for k, v in plan["scale"][scale].items()], claims


def make_recipe(scale: list[str], condition: dict, seed: int, extra: list[str] = ()) -> dict:
    """The quickstart recipe + scale + condition overrides, with this run's seed (the shipped parts stay the same)."""
    condition = dict(condition)
    joint = condition.pop("joint", False)
    # JSON is valid YAML, so every value goes through load_recipe's own parser unchanged.
    overrides = list(scale) + [f"{k}={json.dumps(v)}" for k, v in condition.items()] + [f"seed={seed}"]
    recipe = load_recipe(CONFIG, overrides + list(extra))
    return jointly(recipe) if joint else recipe


def jointly(recipe: dict) -> dict:
    """All the phases' steps in one phase that trains every part on both tasks (not the paper's method)."""
    recipe = copy.deepcopy(recipe)
    total = sum(phase_steps(recipe, name) for name in recipe["phases"])
    recipe["phases"] = {"joint": {"stage": "joint", "tasks": {"bbox2caption": 1.0, "caption2bbox": 1.0},
                                  "training": {"max_steps": total}}}
    return recipe


def phase_steps(recipe: dict, name: str) -> int:
    return recipe["phases"][name]["training"].get("max_steps", recipe["training"].get("max_steps", 0))


def train_images(recipe: dict) -> int:
    data = recipe["data"]
    return int(data["train_images"] or data["sizes"]["train"])


# ============================================================================================ one run
def run_one(recipe: dict, data_dir: Path, work: Path) -> dict:
    """Train one model with `recipe` on the first `train_images` images of `data_dir`, score and probe it.

    The runner's per-phase validation reads the *test* split here (every region), so the scores after stage 1 and
    after the whole run are held-out scores of the same queries.
    """
    start = time.time()
    recipe = copy.deepcopy(recipe)
    recipe["output_dir"] = str(work)
    set_dotted(recipe, "data.path", str(data_dir))
    set_dotted(recipe, "data.splits", {"train": "train", "val": "test", "test": "test"})
    set_dotted(recipe, "eval.every", 0)  # phase ends only
    set_dotted(recipe, "eval.val_regions", None)  # every region of the split
    full_train = load_split(data_dir, "train")
    if train_images(recipe) > len(full_train):
        raise ValueError(f"{data_dir} holds {len(full_train)} training images, the run needs {train_images(recipe)}")
    test = load_split(data_dir, "test")
    # The probe is fit on the same training-split images in every run, whatever the model was trained on: with a
    # smaller training set it would otherwise also get a smaller probe set and confound the data-size claim.
    probe_train = full_train.select(range(min(PROBE_TRAIN_IMAGES, len(full_train))))
    roi = recipe["training"].get("roi_output_size", 2)

    built = RunState()
    model, processor = build_model(recipe, built, log=lambda *a: None)
    result = {"probe_init": linear_probe(model, processor, probe_train, test, roi, seed=recipe["seed"])}
    model, processor, state, _ = run(recipe, start_from=(model, processor))
    t0 = time.time()
    model.eval()
    scores = evaluate_synthetic(model, processor, test, batch_size=64, train=full_train.select(range(train_images(recipe))),
                                progress=False)
    state.timings["eval_s"] = time.time() - t0
    result["scores"] = {k: scores[k] for k in SCORE_KEYS}
    result["phases"] = state.phase_scores  # held-out scores at the start and after each phase
    if "stage1" in state.phase_scores:
        result["after_stage1"] = state.phase_scores["stage1"]  # the paper's "stage 1 only" grounding (~13% vs ~55%)
    result["probe"] = linear_probe(model, processor, probe_train, test, roi, seed=recipe["seed"])
    state.timings["total_s"] = time.time() - start
    result.update(timings=state.timings, steps=state.steps, curve=state.curve["loss"],
                  annotation_noise=state.annotation_noise, parts={  # hash, figures, command
        k: {m: v for m, v in r.items() if m != "loss_curve"} for k, r in built.parts.items()})
    return result


def find_same_run(out: Path, recipe: dict, smoke: bool) -> Path | None:
    """A finished, not itself reused, run of exactly this recipe (seed included) under `out`, if any."""
    for path in sorted((out / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        if not run.get("reused_from") and run.get("smoke") == smoke and run.get("recipe") == recipe:
            return path
    return None


def data_dir_for(recipe: dict, max_train_images: int, root: Path) -> Path:
    """The shared synthetic set (data seed 0) large enough for every run of the plan; written once."""
    from ..train.data.synth import write_synth
    from ..train.runner import synth_config

    data = {k: v for k, v in recipe["data"].items() if k not in ("path", "splits", "train_images", "streaming")}
    data["sizes"] = {**data["sizes"], "train": max_train_images}
    # The folder name carries a digest of the generator settings: a recipe change never reuses a stale set.
    digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    folder = root / f"synth-train{max_train_images}-{digest}"
    return write_once(folder, lambda tmp: write_synth(str(tmp), {k: int(v) for k, v in data["sizes"].items()},
                                                       synth_config(recipe), seed=0))


def write_once(folder: Path, write) -> Path:
    """`write(tmp)` into a sibling folder renamed into place: processes side by side never read a half-written set."""
    if (folder / "README.md").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    write(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: its copy is the same pure function of the settings
        shutil.rmtree(tmp)
    return folder


def ablation_run(claim: str, name: str, recipe: dict, data_dir: Path, smoke: bool, threads: int) -> dict:
    """One computed run's JSON (a job of experiments/schedule.py): trained and scored in a folder of its own."""
    with tempfile.TemporaryDirectory(prefix="granvit-ablation-") as work:
        result = run_one(recipe, data_dir, Path(work))
    return {**result, "smoke": smoke, "threads": threads, "recipe": recipe, "train_images": train_images(recipe),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "claim": claim, "condition": name, "seed": recipe["seed"]}


def reuse(source: Path, path: Path, out: Path, claim: str, name: str, seed: int) -> None:
    """`path` as a copy of the finished run `source` of the same recipe (e.g. distill/lambda1 and data/n1000 are the
    staged recipe itself: the same seeded run, not trained twice)."""
    result = json.loads(source.read_text())
    result.update(reused_from=str(source.relative_to(out)), claim=claim, condition=name, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"{claim}/{name} seed {seed}: same recipe as {result['reused_from']}, reused", flush=True)


def figures(result: dict) -> str:
    return json.dumps({**{k: result["scores"][k] for k in ("grounding_acc50", "caption_exact")},
                       **{k: result["probe"][k] for k in ("probe_shape_acc", "probe_colour_acc")},
                       "total_s": round(result["timings"]["total_s"], 1)})


# ============================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claim", nargs="+", required=True, choices=("stages", "distill", "data", "balance", "noise"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few images (the test preset)")
    parser.add_argument("--scale", default="full", choices=("full", "long"), help="scale preset (ablations.yaml)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (runs/, summary.md, PNGs)")
    parser.add_argument("--data-root", help="where the synthetic set is cached (default: <out>/data)")
    add_arguments(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every run (recorded in each JSON)")
    parser.add_argument("--conditions", nargs="+", help="run only these conditions of the claims (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists (and reuse no stored run)")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
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
    recipes = [make_recipe(scale, cond, seed, extra=[f"threads={args.threads}", *args.set]) for _, _, cond, seed in plan]
    # One synthetic set for every claim of the preset (sized for the largest), so separate invocations share it.
    max_train = max(train_images(make_recipe(scale, cond, 0, extra=args.set)) for conds in claims.values()
                    for cond in conds.values())
    jobs, copies, planned = [], [], {}  # planned: recipe -> the JSON of the run of this call that trains it
    for (claim, name, _, seed), recipe in zip(plan, recipes):
        path = out / "runs" / claim / f"{name}_seed{seed}.json"
        key = json.dumps(recipe, sort_keys=True)
        to_run = args.force or not path.exists()
        # --force means "compute again": never substitute a stored run (the old JSON of this very path included)
        source = find_same_run(out, recipe, args.smoke) if to_run and not args.force else None
        if source is not None:
            reuse(source, path, out, claim, name, seed)
        elif to_run and not args.force and key in planned:
            copies.append((planned[key], path, claim, name, seed))  # copied once its source has trained
        else:
            if to_run:
                planned.setdefault(key, path)
            # The shared set is written here, before any run starts: the workers only read it.
            data = data_dir_for(recipe, max_train, data_root) if to_run else None
            jobs.append(Job(f"{claim}/{name} seed {seed}", path, ablation_run,
                            (claim, name, recipe, data, args.smoke, args.threads)))
    failed = run_jobs(jobs, args.jobs, args.threads, args.force, line=figures)
    for source, path, claim, name, seed in copies:
        if source.exists():
            reuse(source, path, out, claim, name, seed)
        else:
            print(f"{claim}/{name} seed {seed}: not written, its run {source} failed", flush=True)

    from .aggregate import aggregate

    aggregate(out)
    check(failed)
    return [out / "runs" / claim / f"{name}_seed{seed}.json" for claim, name, _, seed in plan]


if __name__ == "__main__":
    main()
