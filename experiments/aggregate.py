"""Run JSONs -> `summary.md` (mean +- std per condition, effect sizes) and one PNG per claim.

    python -m granvit.experiments.aggregate [--out experiments/results/claims_pipeline]

With 3 seeds the tests are a rough guide only: a Welch t-test between arms, and a paired t-test over seeds (a seed
fixes the initialisation and the batch order in both arms). The table shows every seed count so a reader can judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the experiments run on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "claims_pipeline"
# (label, path into the run JSON, baseline path or None)
METRICS = (
    ("grounding ACC@0.5", ("scores", "grounding_acc50"), ("scores", "grounding_acc50_baseline")),
    ("caption exact", ("scores", "caption_exact"), ("scores", "caption_exact_baseline")),
    ("probe shape", ("probe", "probe_shape_acc"), ("probe", "probe_shape_majority")),
    ("probe colour", ("probe", "probe_colour_acc"), ("probe", "probe_colour_majority")),
)
EXTRA = (
    ("ACC@0.5 after stage 1", ("after_stage1", "grounding_acc50")),
    ("probe shape at init", ("probe_init", "probe_shape_acc")),
    ("probe colour at init", ("probe_init", "probe_colour_acc")),
)
# Which two conditions the effect compares: (treatment, control); for "data" the largest vs the smallest set.
CONTRASTS = {"stages": [("staged", "joint")], "distill": [("lambda1", "lambda0")],
             "balance": [("staged", "joint"), ("joint_pcgrad", "joint"), ("staged", "joint_pcgrad")],
             "noise": [("clean", "engine"), ("clean", "heavy"), ("heavy_filtered", "heavy")]}


def get(run: dict, path: tuple[str, str]):
    section = run.get(path[0])
    return None if section is None else section.get(path[1])


def load_runs(out: Path) -> dict[str, dict[str, list[dict]]]:
    """{claim: {condition: [run, ...]}} with conditions in a stable order (training-set size for "data")."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((out / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["claim"], {}).setdefault(run["condition"], []).append(run)
    for claim, conditions in runs.items():
        order = sorted(conditions, key=lambda c: (conditions[c][0]["train_images"], c)) if claim == "data" else sorted(conditions)
        runs[claim] = {c: sorted(conditions[c], key=lambda r: r["seed"]) for c in order}
    return runs


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = np.std(values, ddof=1) if len(values) > 1 else float("nan")
    return f"{100 * np.mean(values):.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * values[0]:.1f}"


def contrasts(claim: str, conditions: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """(treatment, control) pairs to report; for "data" each size vs the next smaller one, then largest vs smallest."""
    if claim == "data":
        names = list(conditions)  # ordered by training-set size
        pairs = [(names[i + 1], names[i]) for i in range(len(names) - 1)]
        return pairs + [(names[-1], names[0])] if len(names) > 2 else pairs
    return [pair for pair in CONTRASTS.get(claim, []) if all(p in conditions for p in pair)]


def effect_rows(claim: str, conditions: dict[str, list[dict]]) -> list[str]:
    """Per contrast, one line per metric: difference of means (points), Welch t-test p, and the seeds behind it."""
    lines = []
    for a, b in contrasts(claim, conditions):
        lines += [f"Effect `{a}` − `{b}` (percentage points; Welch t-test, two-sided; then the same seeds paired):", ""]
        for label, path, _ in METRICS:
            xa = [get(r, path) for r in conditions[a] if get(r, path) is not None]
            xb = [get(r, path) for r in conditions[b] if get(r, path) is not None]
            if not xa or not xb:
                continue
            diff = 100 * (np.mean(xa) - np.mean(xb))
            if len(xa) > 1 and len(xb) > 1 and (np.std(xa) > 0 or np.std(xb) > 0):
                p = f"p = {stats.ttest_ind(xa, xb, equal_var=False).pvalue:.3f}"
            else:
                p = "p: n/a (fewer than 2 seeds per arm or no variance)"
            lines.append(f"- {label}: {diff:+.1f} ({p}; n = {len(xa)} vs {len(xb)}{paired(conditions[a], conditions[b], path)})")
        lines.append("")
    if "staged" in conditions:  # stages and balance
        lines += [*stage2_gain(conditions["staged"]), ""]
    return lines


def paired(runs_a: list[dict], runs_b: list[dict], path: tuple[str, str]) -> str:
    """A seed fixes the initialisation and the batch order in both arms: the per-seed differences, paired."""
    a = {r["seed"]: get(r, path) for r in runs_a if get(r, path) is not None}
    b = {r["seed"]: get(r, path) for r in runs_b if get(r, path) is not None}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return ""
    diffs = [a[s] - b[s] for s in seeds]
    p = f", paired p = {stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue:.3f}" if np.std(diffs) > 0 else ""
    return f"; higher in {sum(d > 0 for d in diffs)} of {len(seeds)} seeds{p}"


def stage2_gain(runs: list[dict]) -> list[str]:
    """The paper's stage-1-only vs after-stage-2 grounding (its ~13% vs ~55%), paired by seed within the staged runs."""
    pairs = [(get(r, ("scores", "grounding_acc50")), get(r, ("after_stage1", "grounding_acc50"))) for r in runs]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return []
    diffs = [100 * (a - b) for a, b in pairs]
    p = f"paired t-test p = {stats.ttest_rel(*zip(*pairs)).pvalue:.3f}" if len(pairs) > 1 and np.std(diffs) > 0 else "p: n/a"
    return [f"Stage 2's own gain in grounding ACC@0.5 (staged: final − after stage 1, same runs): "
            f"{np.mean(diffs):+.1f} points ({p}; n = {len(pairs)})"]


def describe_parts(recipe: dict) -> str:
    """The parts of a run's recipe: their sizes when the recipe trained its own (a `parts` section), else the shipped
    pretrained parts (`embedded`), whose sizes are in their own parts.json."""
    if not recipe.get("parts"):
        return (f"the shipped pretrained parts (vision {recipe['model']['vision']}, llm {recipe['model']['llm']}), "
                f"{recipe['data']['synth']['image_size']} px images")
    siglip, lm = recipe["parts"]["siglip"], recipe["parts"]["lm"]
    return (f"ViT {siglip['layers']} x {siglip['hidden']} (small SigLIP), LLM {lm['layers']} x {lm['hidden']} (small "
            f"Qwen2), {siglip['image_size']} px / {siglip['patch_size']} px patches")


def summary_markdown(runs: dict) -> str:
    lines = ["# Ablation results (tiny scale, synthetic set)", "",
             "Generated by `python -m granvit.experiments.aggregate` from `runs/*/*.json`. Values are percentages, "
             "mean ± std over seeds (sample std). Baselines: mean training box (grounding), most common training "
             "caption (caption exact), majority class (probes). Wall time is per run (training + 2-3 evaluations + "
             "probes).", ""]
    for claim, conditions in runs.items():
        smoke = any(r.get("smoke") for rs in conditions.values() for r in rs)
        lines += [f"## {claim}" + (" (SMOKE preset: not a result)" if smoke else ""), ""]
        r = next(iter(conditions.values()))[0]["recipe"]
        lines += [f"Recipe of the runs: {describe_parts(r)}, "
                  f"{r['training']['per_device_train_batch_size']} images per step, {r['data']['sizes']['test']} test "
                  f"images, box format {r['model']['box_format']}; steps per condition in the table.", ""]
        header = ["condition", "seeds", "train images", "steps"] + [m[0] for m in METRICS] + [e[0] for e in EXTRA] + ["wall s/run"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, rs in conditions.items():
            seeds = ",".join(str(r["seed"]) for r in rs)
            reused = sorted({r["reused_from"].removeprefix("runs/").split("_seed")[0] for r in rs if r.get("reused_from")})
            if reused:  # the same recipe and seed already ran for another claim: its JSON is copied, not rerun
                seeds += f" (= {', '.join(reused)})"
            cells = [name, seeds, str(rs[0]["train_images"]), str(rs[0]["steps"])]
            cells += [mean_std([get(r, m[1]) for r in rs]) for m in METRICS]
            cells += [mean_std([get(r, e[1]) for r in rs]) for e in EXTRA]
            cells.append(f"{np.mean([r['timings']['total_s'] for r in rs]):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        baseline = ["baseline", "", "", ""] + [mean_std([get(r, m[2]) for rs in conditions.values() for r in rs]) for m in METRICS]
        lines.append("| " + " | ".join(baseline + [""] * (len(header) - len(baseline))) + " |")
        total = sum(r["timings"]["total_s"] for rs in conditions.values() for r in rs if not r.get("reused_from"))
        lines += ["", f"Wall time of the runs this claim added (reused runs not counted again): {total / 60:.1f} min.", ""]
        lines += effect_rows(claim, conditions)
    return "\n".join(lines)


def plot_claim(claim: str, conditions: dict[str, list[dict]], path: Path) -> Path:
    """Mean ± std per condition with every seed as a dot; dashed line = the metric's trivial baseline."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2))
    names = list(conditions)
    for ax, (label, metric, base) in zip(axes, METRICS):
        series = [(n if claim != "data" else str(conditions[n][0]["train_images"]),
                   [100 * get(r, metric) for r in conditions[n] if get(r, metric) is not None]) for n in names]
        if claim in ("stages", "balance") and metric == ("scores", "grounding_acc50"):
            # the paper's "stage 1 only" point: the staged runs scored before their stage 2
            series += [(f"{n}\n(after stage 1)", [100 * get(r, ("after_stage1", "grounding_acc50")) for r in conditions[n]
                                                  if get(r, ("after_stage1", "grounding_acc50")) is not None]) for n in names]
            series = [s for s in series if s[1]]
        x = np.arange(len(series))
        means = [np.mean(v) if v else np.nan for _, v in series]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in series]
        if claim == "data":
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=4)
            ax.set_xlabel("training images")
        else:
            ax.bar(x, means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, (_, v) in enumerate(series):
            ax.scatter([i] * len(v), v, color="k", s=12, zorder=3)
        baselines = [100 * get(r, base) for rs in conditions.values() for r in rs if get(r, base) is not None]
        if baselines:
            ax.axhline(np.mean(baselines), color="grey", linestyle="--", linewidth=1, label="baseline")
        ax.set_xticks(x, [name for name, _ in series], fontsize=8)
        ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))  # a flat 0 stays readable as 0 on a percentage axis
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("%")
    axes[0].legend(fontsize=8)
    smoke = any(r.get("smoke") for rs in conditions.values() for r in rs)
    fig.suptitle(f"claim: {claim}" + (" (smoke preset)" if smoke else "") + " - mean ± std over seeds, dots = seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def aggregate(out: str | Path = DEFAULT_OUT) -> Path:
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"no run JSONs under {out / 'runs'}: run `python -m granvit.experiments.ablations` first")
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs))
    for claim, conditions in runs.items():
        plot_claim(claim, conditions, out / f"{claim}.png")
    print(f"wrote {summary} and {', '.join(f'{c}.png' for c in runs)}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder holding runs/")
    aggregate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
