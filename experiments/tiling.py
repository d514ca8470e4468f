"""Does tiling help a small GranViT on small objects and small text? Tiled vs untiled at one base resolution, seeded.

    python -m granvit.experiments.tiling --seeds 0 1                      # 2 arms x 2 seeds, one run per core
    python -m granvit.experiments.tiling --seeds 0 --smoke --out /tmp/t   # a few steps, to check the pipeline

The model is the main job's (train/configs/quickstart.yaml: the embedded 128 px SigLIP with 32 px patches, 16 image
tokens per view, and the embedded small LLM, cached); only ``model.max_tiles`` differs between the arms (0 or 4: a
256 px image then gets a 2 x 2 grid of 128 px tiles + the 128 px thumbnail, 5 views, 80 image tokens). The data is a
synthetic set written at 256 px, twice the base resolution, with what a fixed resize loses: scenes of 1-3 *small*
objects (10-20% of the side: 26-51 px, 13-26 px after the untiled resize, under one 32 px patch) and, in 30% of the
images, text pages (fonts 1/20-1/8 of the side: 12-32 px, 6-16 px after the resize). Both arms train the same steps
(stage 1 then stage 2) on the same 1000 images and are scored on the same 100 held-out images:

    natural regions  grounding ACC@0.5 (box grammar) and region-caption exact match ("small red circle")
    OCR regions      reading: the region caption (the word or line in the box) exact and ANLS, and grounding
    probe            linear probe of shape and colour on ROI features of natural regions (eval/probe.py),
                     before training (the same weights, only the input differs) and after

The runs go `--jobs` at a time, one per core by default (experiments/schedule.py: a run's output in <its JSON>.log).
Results: <out>/runs/<arm>_seed<N>.json (a finished run is skipped unless --force), then <out>/summary.md (mean and
per-seed values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..eval.metrics import anls
from ..eval.run import evaluate_synthetic, generate
from ..train.quickstart import CONFIG, SMOKE
from ..train.recipe import load_recipe, section
from ..train.runner import RunState, build_model, load_split, run
from ..eval.probe import linear_probe
from .ablations import write_once
from .schedule import Job, add_arguments, check, run_jobs

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "results" / "tiling"
DEFAULT_DATA = HERE.parent / "outputs" / "tiling-data"  # git-ignored; written once, shared by every run
ARMS = {"untiled": 0, "tiled4": 4}
SYNTH = {"image_size": 256, "min_objects": 1, "max_objects": 3, "object_size": (0.1, 0.2), "num_sizes": 2,
         "shapes": ("circle", "square", "triangle", "star"),
         "colours": ("red", "green", "blue", "yellow", "purple", "orange"),
         "textures": ("solid",), "allow_duplicates": False, "relations": False, "ocr_fraction": 0.3}
SIZES = {"train": 1000, "test": 100}
PROBE_TRAIN_IMAGES = 400


def write_data(folder: Path, smoke: bool) -> Path:
    """The shared set, written once (whole or not at all) before any run starts."""
    from ..train.data.synth import SynthConfig, write_synth

    sizes = {"train": 24, "test": 8} if smoke else SIZES
    return write_once(folder, lambda tmp: write_synth(str(tmp), sizes, SynthConfig(**SYNTH), seed=0))


def make_recipe(max_tiles: int, seed: int, args, work: Path, data: Path) -> dict:
    overrides = [f"output_dir={work}", f"data.path={data}", f"seed={seed}",
                 f"threads={args.threads}", f"model.max_tiles={max_tiles}", "training.disable_tqdm=true",
                 "data.regions_per_image=4",  # a text page holds dozens of words: 4 queries per image, as for scenes
                 f"phases.stage1.training.max_steps={args.stage1_steps}",
                 f"phases.stage2.training.max_steps={args.stage2_steps}"]
    recipe = load_recipe(CONFIG, (SMOKE if args.smoke else []) + overrides)
    recipe["data"]["splits"] = {"train": "train", "val": "test", "test": "test"}
    recipe["eval"] = section("eval")  # no validation during training: the scores below are the only evaluation
    return recipe


def kind_subset(dataset, kind: int, per_image: int = 4):
    """Rows keeping only their first ``per_image`` regions of one kind (0 natural, 1 OCR: the ClassLabel order), rows
    without any dropped: the scored regions then spread over many pages instead of the first few."""
    def keep(regions):
        return {"regions": [r for r in regions if r["kind"] in (kind, ("natural", "ocr")[kind])][:per_image]}

    kept = dataset.map(keep, input_columns=["regions"])
    return kept.filter(lambda regions: len(regions) > 0, input_columns=["regions"])


@torch.no_grad()
def reading_anls(model, processor, dataset, limit: int) -> float:
    """Mean ANLS of the region captions of OCR regions (the word or line in the box), greedy, one batch per image."""
    scores = []
    for row in dataset:
        image = row["image"].convert("RGB")
        regions = row["regions"][: max(0, limit - len(scores))]
        if not regions:
            break
        prompts = [processor.bbox2caption_prompt(r["bbox"], image.size) for r in regions]
        ids = generate(model, processor, [image] * len(prompts), prompts, max_new_tokens=12)
        answers = processor.batch_decode(ids, skip_special_tokens=True)
        scores += [anls(answer.strip(), [r["caption"]]) for answer, r in zip(answers, regions)]
    return statistics.mean(scores) if scores else float("nan")


def run_arm(arm: str, seed: int, args, data: Path) -> dict:
    """One arm and seed, trained in a folder of its own and scored (a job of experiments/schedule.py)."""
    with tempfile.TemporaryDirectory(prefix="granvit-tiling-") as work:
        return train_and_score(arm, seed, args, data, Path(work))


def train_and_score(arm: str, seed: int, args, data: Path, work: Path) -> dict:
    start = time.time()
    recipe = make_recipe(ARMS[arm], seed, args, work, data)
    train, test = load_split(data, "train"), load_split(data, "test")
    probe_train = train.select(range(min(PROBE_TRAIN_IMAGES, len(train))))
    roi = recipe["training"].get("roi_output_size", 2)
    model, processor = build_model(recipe, RunState(), log=lambda *a: None)
    result = {"arm": arm, "seed": seed, "max_tiles": ARMS[arm], "recipe": recipe,
              "probe_init": linear_probe(model, processor, probe_train, test, roi, seed=seed)}
    model, processor, state, _ = run(recipe, start_from=(model, processor))
    model.eval()
    t0 = time.time()
    natural, ocr = kind_subset(test, 0), kind_subset(test, 1)
    keys = ("grounding_acc50", "grounding_miou", "caption_exact", "grounding_acc50_baseline", "caption_exact_baseline",
            "num_regions")
    for name, subset in (("natural", natural), ("ocr", ocr)):
        scores = evaluate_synthetic(model, processor, subset, limit=args.eval_regions, batch_size=32, train=train,
                                    unconstrained=False, progress=False)
        result[name] = {k: scores[k] for k in keys}
    result["ocr"]["reading_anls"] = reading_anls(model, processor, ocr, args.eval_regions)
    result["probe"] = linear_probe(model, processor, probe_train, test, roi, seed=seed)
    state.timings["eval_s"] = time.time() - t0
    state.timings["total_s"] = time.time() - start
    result.update(timings=state.timings, steps=state.steps, curve=state.curve["loss"],
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"), smoke=args.smoke)
    return result


ROWS = [("natural", "grounding_acc50", "small objects: grounding ACC@0.5"),
        ("natural", "caption_exact", "small objects: region caption exact"),
        ("ocr", "caption_exact", "text: reading exact (word / line in the box)"),
        ("ocr", "reading_anls", "text: reading ANLS"),
        ("ocr", "grounding_acc50", "text: grounding ACC@0.5"),
        ("probe_init", "probe_shape_acc", "probe shape, before training"),
        ("probe_init", "probe_colour_acc", "probe colour, before training"),
        ("probe", "probe_shape_acc", "probe shape, after training"),
        ("probe", "probe_colour_acc", "probe colour, after training")]


def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    lines = ["| measure | " + " | ".join(f"{arm} (seeds {', '.join(str(r['seed']) for r in rs)})"
                                        for arm, rs in by_arm.items()) + " | tiled - untiled |",
             "|---|" + "---|" * (len(ARMS) + 1)]
    for group, key, label in ROWS:
        cells, means = [], []
        for rs in by_arm.values():
            values = [r[group][key] for r in rs]
            means.append(statistics.mean(values) if values else float("nan"))
            cells.append(f"{means[-1]:.3f} ({' / '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {means[1] - means[0]:+.3f} |")
    base = [r["natural"]["grounding_acc50_baseline"] for r in runs] + [r["natural"]["caption_exact_baseline"] for r in runs]
    seconds = {arm: statistics.mean(r["timings"]["total_s"] for r in rs) for arm, rs in by_arm.items() if rs}
    lines.append("")
    lines.append(f"Baselines (natural): mean box {base[0]:.3f}, most common caption {base[len(runs)]:.3f}. "
                 "Wall time per run (train + eval + probes): "
                 + ", ".join(f"{arm} {s / 60:.1f} min" for arm, s in seconds.items()) + ".")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def figures(result: dict) -> str:
    return json.dumps({
        "natural_acc50": result["natural"]["grounding_acc50"], "ocr_exact": result["ocr"]["caption_exact"],
        "ocr_anls": result["ocr"]["reading_anls"], "probe_init_shape": result["probe_init"]["probe_shape_acc"],
        "probe_shape": result["probe"]["probe_shape_acc"], "total_s": round(result["timings"]["total_s"])})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--stage1-steps", type=int, default=50)
    parser.add_argument("--stage2-steps", type=int, default=150)
    parser.add_argument("--eval-regions", type=int, default=100, help="regions scored per kind (natural, OCR)")
    add_arguments(parser)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--data", help=f"the synthetic set folder (default: {DEFAULT_DATA}, or <out>/data with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.stage1_steps, args.stage2_steps, args.eval_regions = 2, 2, 8
    out = Path(args.out)
    data = write_data(Path(args.data) if args.data else out / "data" if args.smoke else DEFAULT_DATA, args.smoke)
    # seed-major: a cut-short session still has paired arms
    jobs = [Job(f"{arm} seed {seed}", out / "runs" / f"{arm}_seed{seed}.json", run_arm, (arm, seed, args, data))
            for seed in args.seeds for arm in args.arms]
    failed = run_jobs(jobs, args.jobs, args.threads, args.force, line=figures)
    if any(job.path.exists() for job in jobs):
        print(summarize(out))
    check(failed)


if __name__ == "__main__":
    main()
