"""The paper's headline comparison at small scale: does GranViT make a better *encoder* once transferred?

    python -m granvit.experiments.transfer --seeds 0 1 2                     # every row and seed, one run per core
    python -m granvit.experiments.transfer --summary                                    # table + plot only
    python -m granvit.experiments.transfer --smoke --seeds 0 --rows siglip stage1 --out /tmp/transfer   # < 1 min

The paper freezes each vision encoder, plugs it into the same fresh MLLM (new projector + Qwen2.5-1.5B), trains that
MLLM with one recipe and scores three benchmark families (fine-grained, VQA, OCR). Here, per row and seed:

    encoder   the pretrained small SigLIP part (`siglip`, the paper's SigLIP 2 row), or the ViT after the main job's
              stage 1 with (`stage1`: GranViT's encoder, as stage 2 keeps the ViT frozen) or without
              (`stage1_nodistill`) self-distillation, or after a joint run training every part for the same steps
              (`joint`); trained by the one runner (train/runner.py), then `granvit-export-encoder`
    transfer  `granvit-build --vision <encoder> --llm <the same pretrained small LM>` (a new projector), the ViT frozen,
              projector + LM trained on the downstream mix (`granvit-data downstream`, all ten benchmarks), then
              every held-out benchmark scored (eval/downstream.py) and the three family averages
    probe     a linear probe of the encoder's region features (ROIAlign at each box -> shape / colour), as the
              ablations do (eval/probe.py)

Sizes and rows: experiments/configs/transfer.yaml. A seed sets the encoder training's and the transfer's
initialisation and batch order; the parts, the synthetic sets and the downstream set are the same for every seed.
The runs go `--jobs` at a time, one per core by default (experiments/schedule.py: a run's output in <its JSON>.log).
Results: <out>/runs/<row>_seed<N>.json (a finished run is skipped unless --force), <out>/summary.md, <out>/transfer.png.
Each JSON records `encoder_unchanged`: the frozen encoder's weights compared bitwise before and after transfer.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ..train.fields import set_dotted
from ..train.recipe import section
from .ablations import PROBE_TRAIN_IMAGES, REPO, RESULTS, data_dir_for, jointly, make_recipe, write_once
from .aggregate import mean_std
from ..eval.probe import linear_probe
from .schedule import Job, add_arguments, check, run_jobs

HERE = Path(__file__).parent
PLAN = HERE / "configs" / "transfer.yaml"
DEFAULT_OUT = RESULTS / "transfer"
FAMILIES = ("fine-grained", "vqa", "ocr")


# ============================================================================================ plan and recipes
def load_plan(smoke: bool, path: Path = PLAN) -> tuple[dict, dict]:
    """(scale settings, {row: encoder overrides or None}) of the full or the smoke preset."""
    plan = yaml.safe_load(path.read_text())
    return plan["scale"]["smoke" if smoke else "full"], plan["rows"]


def encoder_recipe(scale: dict, row: dict | None, seed: int, smoke: bool, extra: list[str] = ()) -> dict:
    """The main job's recipe cut to its stage 1 (`encoder_steps`), with the row's overrides and this seed."""
    from ..train.quickstart import SMOKE

    overrides = (list(SMOKE) if smoke else []) + [f"{k}={json.dumps(v)}" for k, v in scale["encoder"].items()]
    recipe = make_recipe(overrides, {k: v for k, v in (row or {}).items() if k != "joint"}, seed, extra)
    recipe["phases"] = {"stage1": recipe["phases"]["stage1"]}
    set_dotted(recipe, "phases.stage1.training.max_steps", scale["encoder_steps"])
    return jointly(recipe) if (row or {}).get("joint") else recipe


def transfer_recipe(encoder: dict, scale: dict, checkpoint: Path, downstream: Path, work: Path) -> dict:
    """One phase, the ViT frozen (stage 2's freezing), projector + LM on every downstream benchmark; no validation."""
    recipe = copy.deepcopy(encoder)
    settings = dict(scale["transfer"])
    recipe.update(output_dir=str(work), eval=section("eval"), phases={"transfer": {
        "stage": "2", "tasks": {"downstream": 1.0}, "training": {"max_steps": settings.pop("max_steps")}}})
    recipe["model"] = section("model", {"checkpoint": str(checkpoint)})
    recipe["data"] = section("data", {"path": str(downstream)})
    recipe["training"] = {**recipe["training"], **settings}
    recipe["training"].pop("distill_lambda", None)
    recipe["training"].pop("train_new_token_rows", None)
    return recipe


def downstream_dir(scale: dict, root: Path) -> Path:
    """The downstream set (data seed 0) of this preset's sizes; written once under `root`."""
    from ..train.data.downstream import write_downstream

    sizes = {"train": scale["downstream"]["train"], "test": scale["downstream"]["test"]}
    size = scale["downstream"]["image_size"]
    digest = hashlib.sha1(json.dumps([sizes, size], sort_keys=True).encode()).hexdigest()[:8]
    return write_once(root / f"downstream-{digest}", lambda tmp: write_downstream(str(tmp), sizes, image_size=size))


# ============================================================================================ one row, one seed
def make_encoder(row: str, recipe: dict, synth_dir: Path, work: Path) -> tuple[Path, Path, dict]:
    """(encoder folder, LM folder, {timings, parts}): the pretrained part, or a trained and exported ViT."""
    from ..hub.export_encoder import export_encoder
    from ..train.build import save_granvit
    from ..train.runner import embedded_parts, run

    start = time.time()
    silent = lambda *a, **k: None  # noqa: E731
    vision, llm, parts = embedded_parts(recipe, log=silent)
    info = {"parts": {k: {m: v for m, v in r.items() if m != "loss_curve"} for k, r in parts.items()}}
    if row == "siglip":
        info["timings"] = {"encoder_s": time.time() - start}
        return Path(vision), Path(llm), info
    recipe = copy.deepcopy(recipe)
    recipe["output_dir"] = str(work / "encoder-run")
    set_dotted(recipe, "data.path", str(synth_dir))
    recipe["eval"] = section("eval")  # no validation
    model, processor, state, _ = run(recipe, log=silent)
    save_granvit(model, processor, work / "encoder-checkpoint")
    export_encoder(work / "encoder-checkpoint", work / "encoder")
    info.update(timings={"encoder_s": time.time() - start, **{f"encoder_{k}": v for k, v in state.timings.items()}},
                encoder_steps=state.steps, encoder_curve=state.curve["loss"])
    return work / "encoder", Path(llm), info


def vision_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.vision_tower.state_dict().items()}


def transfer(encoder: Path, llm: Path, recipe: dict, scale: dict, downstream: Path, synth_dir: Path, work: Path) -> dict:
    """Build a fresh MLLM on the frozen `encoder`, probe its region features, train it on the downstream mix, score it."""
    from ..eval.downstream import evaluate_downstream
    from ..train.build import main as granvit_build
    from ..train.runner import load_checkpoint, load_split, run

    start = time.time()
    built = work / "transfer-build"
    granvit_build(["--vision", str(encoder), "--llm", str(llm), "--out", str(built),
                   "--num-coord-bins", str(recipe["model"]["num_coord_bins"]),
                   "--box-format", recipe["model"]["box_format"]])
    model, processor = load_checkpoint(built)
    result = {"timings": {"build_s": time.time() - start}}

    # The probe reads only the frozen ViT, so it is the encoder's: the same before and after transfer training.
    t0 = time.time()
    train, test = load_split(synth_dir, "train"), load_split(synth_dir, "test")
    roi = recipe["training"].get("roi_output_size", 2)
    result["probe"] = linear_probe(model, processor, train.select(range(min(PROBE_TRAIN_IMAGES, len(train)))), test, roi,
                                   seed=recipe["seed"])
    result["timings"]["probe_s"] = time.time() - t0

    before = vision_weights(model)
    t0 = time.time()
    model, processor, state, _ = run(transfer_recipe(recipe, scale, built, downstream, work / "transfer-run"),
                                     start_from=(model, processor), log=lambda *a, **k: None)
    result["timings"]["transfer_train_s"] = time.time() - t0
    after = vision_weights(model)
    result["encoder_unchanged"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    t0 = time.time()
    model.eval()
    result["downstream"] = evaluate_downstream(model, processor, downstream, split="test", progress=False)
    result["timings"]["eval_s"] = time.time() - t0
    result.update(transfer_steps=state.steps, transfer_curve=state.curve["loss"])
    return result


def run_row(row: str, recipe: dict, scale: dict, smoke: bool, synth_dir: Path, downstream: Path) -> dict:
    """One row and seed, encoder then transfer (a job of experiments/schedule.py); the sets are already written."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="granvit-transfer-") as work:
        encoder, llm, info = make_encoder(row, recipe, synth_dir, Path(work))
        result = transfer(encoder, llm, recipe, scale, downstream, synth_dir, Path(work))
    result["timings"] = {**info.pop("timings"), **result["timings"], "total_s": time.time() - start}
    result.update(info, row=row, seed=recipe["seed"], smoke=smoke, encoder_recipe=recipe, transfer=scale["transfer"],
                  downstream_sizes=scale["downstream"], finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    return result


# ============================================================================================ table and plot
def load_runs(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "runs").glob("*_seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["row"], []).append(run)
    return runs


def figures(run: dict) -> dict:
    """The table's numbers of one run, as fractions: family averages, their mean, the probe's accuracies."""
    families = {f: run["downstream"]["families"][f] for f in FAMILIES}
    return {**families, "average": statistics.mean(families.values()),
            "probe shape": run["probe"]["probe_shape_acc"], "probe colour": run["probe"]["probe_colour_acc"]}


def summary_markdown(runs: dict[str, list[dict]], rows: list[str]) -> str:
    rows = [r for r in rows if r in runs] + sorted(set(runs) - set(rows))
    columns = list(figures(runs[rows[0]][0]))
    lines = ["| encoder | seeds | " + " | ".join(columns) + " | wall s / run |", "|---" * (len(columns) + 3) + "|"]
    for row in rows:
        table = [figures(r) for r in runs[row]]
        cells = [mean_std([t[c] for t in table]) for c in columns]
        wall = statistics.mean(r["timings"]["total_s"] for r in runs[row])
        lines.append(f"| {row} | {len(table)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    benchmarks = sorted(runs[rows[0]][0]["downstream"]["benchmarks"])
    lines += ["", "Per benchmark (score in %, mean ± std over seeds):", "",
              "| benchmark | family | metric | " + " | ".join(rows) + " |", "|---" * (len(rows) + 3) + "|"]
    for b in benchmarks:
        first = runs[rows[0]][0]["downstream"]["benchmarks"][b]
        cells = [mean_std([r["downstream"]["benchmarks"][b]["score"] for r in runs[row]]) for row in rows]
        lines.append(f"| {b} | {first['family']} | {first['metric']} | " + " | ".join(cells) + " |")
    unchanged = all(r["encoder_unchanged"] for rs in runs.values() for r in rs)
    lines += ["", f"Frozen encoder bitwise unchanged by transfer training in every run: {unchanged}."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], rows: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r in runs]
    groups = list(FAMILIES) + ["average"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        table = [figures(r) for r in runs[row]]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        means = [100 * statistics.mean(t[c] for t in table) for c in groups]
        errors = [100 * statistics.stdev(t[c] for t in table) if len(table) > 1 else 0 for c in groups]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=row, alpha=0.8)
        for x, c in zip(xs, groups):  # every seed as a dot
            ax.scatter([x] * len(table), [100 * t[c] for t in table], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("score (%), mean ± std over seeds")
    ax.set_title("Frozen encoder -> fresh small MLLM trained on the downstream mix (held-out)")
    ax.legend(title="encoder", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(out: Path, rows: list[str]) -> Path:
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no runs under {out / 'runs'}")
    (out / "summary.md").write_text(summary_markdown(runs, rows))
    plot(runs, rows, out / "transfer.png")
    return out / "summary.md"


# ============================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", help="encoders to compare (transfer.yaml rows; default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and steps (the test preset)")
    parser.add_argument("--summary", action="store_true", help="only write summary.md and the plot from the runs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (runs/, summary.md, transfer.png)")
    parser.add_argument("--data-root", help="where the synthetic and downstream sets are cached (default: <out>/data)")
    add_arguments(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override of the encoder recipe (recorded in each JSON)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    out = Path(args.out)
    scale, rows = load_plan(args.smoke)
    if args.summary:
        print(summarize(out, list(rows)).read_text())
        return []
    unknown = set(args.rows or []) - set(rows)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; transfer.yaml has {list(rows)}")
    default_root = REPO / "outputs" / "experiments-data" if out.resolve() == DEFAULT_OUT.resolve() else out / "data"
    data_root = Path(args.data_root) if args.data_root else default_root
    jobs = []
    for seed in args.seeds:  # seed-major: a cut-short session still has every row of the first seeds
        for row in args.rows or rows:
            path = out / "runs" / f"{row}_seed{seed}.json"
            recipe = encoder_recipe(scale, rows[row], seed, args.smoke, [f"threads={args.threads}", *args.set])
            to_run = args.force or not path.exists()
            # The shared sets are written here, before any run starts: the workers only read them.
            synth = data_dir_for(recipe, int(recipe["data"]["sizes"]["train"]), data_root) if to_run else None
            downstream = downstream_dir(scale, data_root) if to_run else None
            jobs.append(Job(f"{row} seed {seed}", path, run_row, (row, recipe, scale, args.smoke, synth, downstream)))

    def line(result: dict) -> str:
        return (json.dumps({k: round(100 * v, 1) for k, v in figures(result).items()})
                + f" encoder unchanged {result['encoder_unchanged']}")

    failed = run_jobs(jobs, args.jobs, args.threads, args.force, line=line)
    if any(job.path.exists() for job in jobs):
        summarize(out, list(rows))
    check(failed)
    return [job.path for job in jobs]


if __name__ == "__main__":
    main()
