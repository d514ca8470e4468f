"""The ablation scripts end to end on their smoke preset (a few steps, one seed), their recipe plumbing, and the
scheduler every experiment hands its runs to (experiments/schedule.py)."""

import json
import os

import pytest

from granvit.experiments.ablations import load_plan, main, make_recipe
from granvit.eval.probe import caption_attributes


def test_caption_attributes_reads_the_generator_captions():
    assert caption_attributes("small red triangle") == {"shape": "triangle", "colour": "red"}
    assert caption_attributes("large blue striped circle") == {"shape": "circle", "colour": "blue"}
    # a relational caption names two objects, OCR text names none: no single label
    assert caption_attributes("small red triangle left of the large blue circle") is None
    assert caption_attributes("coffee 42") is None


def test_joint_condition_keeps_the_total_steps_in_one_all_parts_phase():
    scale, claims = load_plan(smoke=False)
    staged = make_recipe(scale, claims["stages"]["staged"], seed=0)
    joint = make_recipe(scale, claims["stages"]["joint"], seed=0)
    assert list(staged["phases"]) == ["stage1", "stage2"]
    assert staged["phases"]["stage1"]["training"]["max_steps"] == 150 and staged["data"]["train_images"] == 1000
    assert joint["phases"] == {"joint": {"stage": "joint", "tasks": {"bbox2caption": 1.0, "caption2bbox": 1.0},
                                         "training": {"max_steps": 900}}}
    assert staged["seed"] == 0 and make_recipe(scale, {}, seed=2)["seed"] == 2
    assert staged["model"]["vision"] == "embedded" and staged["parts"] is None  # the seed never moves the shipped parts


def test_smoke_runs_every_claim_and_aggregates(tmp_path):
    main(["--claim", "stages", "distill", "data", "--seeds", "0", "--smoke", "--out", str(tmp_path), "--jobs", "1"])
    runs = {p.relative_to(tmp_path / "runs").as_posix(): json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*.json")}
    assert set(runs) == {"stages/staged_seed0.json", "stages/joint_seed0.json", "distill/lambda1_seed0.json",
                         "distill/lambda0_seed0.json", "data/n4_seed0.json", "data/n8_seed0.json", "data/n16_seed0.json"}
    for run in runs.values():
        assert 0.0 <= run["scores"]["grounding_acc50"] <= 1.0 and 0.0 <= run["scores"]["caption_exact"] <= 1.0
        assert 0.0 <= run["probe"]["probe_colour_acc"] <= 1.0 and run["probe"]["probe_test_regions"] > 0

    staged, joint = runs["stages/staged_seed0.json"], runs["stages/joint_seed0.json"]
    assert staged["steps"] == joint["steps"] == 4  # same total optimizer steps
    assert {e["phase"] for e in joint["curve"]} == {"joint"} and {"stage1", "stage2"} <= {e["phase"] for e in staged["curve"]}
    assert "after_stage1" in staged and "after_stage1" not in joint

    # lambda really reaches stage 1: the logged distillation loss is 0 without it and positive with it
    lambda0 = runs["distill/lambda0_seed0.json"]
    assert all(e["distill_loss"] == 0 for e in lambda0["curve"] if e["phase"] == "stage1")
    assert any(e["distill_loss"] > 0 for e in staged["curve"] if e["phase"] == "stage1")

    # distill/lambda1 and data/n16 are the staged recipe with the same seed: reused, not rerun
    for name in ("distill/lambda1_seed0.json", "data/n16_seed0.json"):
        assert runs[name]["reused_from"] == "runs/stages/staged_seed0.json"
        assert runs[name]["scores"] == staged["scores"] and runs[name]["probe"] == staged["probe"]
    assert [runs[f"data/n{n}_seed0.json"]["train_images"] for n in (4, 8, 16)] == [4, 8, 16]

    summary = (tmp_path / "summary.md").read_text()
    for claim in ("stages", "distill", "data"):
        assert f"## {claim} (SMOKE preset" in summary
        assert (tmp_path / f"{claim}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Effect `staged` − `joint`" in summary and "Effect `n16` − `n4`" in summary
    assert "Effect `n8` − `n4`" in summary and "Effect `n16` − `n8`" in summary  # each size vs the next smaller


@pytest.mark.slow
def test_smoke_balance_and_noise_claims(tmp_path):
    main(["--claim", "balance", "noise", "--seeds", "0", "--smoke", "--out", str(tmp_path), "--jobs", "1"])
    runs = {p.relative_to(tmp_path / "runs").as_posix(): json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*.json")}
    assert runs["noise/clean_seed0.json"]["reused_from"] == "runs/balance/staged_seed0.json"  # the staged recipe itself
    pcgrad = runs["balance/joint_pcgrad_seed0.json"]
    assert all(-1 <= e["task_grad_cosine"] <= 1 for e in pcgrad["curve"])  # the surgery ran at every logged step
    assert all("task_grad_cosine" not in e for e in runs["balance/joint_seed0.json"]["curve"])
    assert pcgrad["recipe"]["training"]["gradient_balance"] == "pcgrad" and pcgrad["steps"] == 4
    clean, heavy = runs["balance/staged_seed0.json"]["annotation_noise"], runs["noise/heavy_seed0.json"]["annotation_noise"]
    assert clean == {} and heavy["regions_before"] > 0 and heavy["missed"] + heavy["wrong_caption"] > 0
    assert "filtered_box_area" in runs["noise/heavy_filtered_seed0.json"]["annotation_noise"] or \
        "filtered_box_aspect" in runs["noise/heavy_filtered_seed0.json"]["annotation_noise"]
    assert all(set(run["parts"]) == {"siglip", "lm"} and all(p["hash"] for p in run["parts"].values()) for run in runs.values())
    summary = (tmp_path / "summary.md").read_text()
    assert "Effect `joint_pcgrad` − `joint`" in summary and "Effect `clean` − `heavy`" in summary


# ---- experiments/schedule.py: the jobs are stdlib callables, so a spawned worker imports nothing of the test's
def test_scheduler_in_process_keeps_a_traceback_skips_what_needs_a_failed_run_and_finished_runs(tmp_path, capsys):
    from granvit.experiments.schedule import Job, run_jobs, traceback_path

    first, bad = tmp_path / "first.json", tmp_path / "bad.json"
    jobs = [Job("first", first, dict, ({"x": 1},)), Job("bad", bad, int, ("not a number",)),
            Job("needs bad", tmp_path / "needs_bad.json", dict, after=(bad,)),
            Job("last", tmp_path / "last.json", dict, ({"y": 2},))]
    failed = run_jobs(jobs, workers=1)
    assert [job.name for job in failed] == ["bad", "needs bad"]  # the run after the failure still ran
    assert json.loads(first.read_text()) == {"x": 1} and json.loads((tmp_path / "last.json").read_text()) == {"y": 2}
    assert not bad.exists() and not (tmp_path / "needs_bad.json").exists()
    assert "ValueError: invalid literal for int() with base 10: 'not a number'" in traceback_path(jobs[1]).read_text()
    out = capsys.readouterr().out
    assert "FAILED needs bad after 0 s (not run: it needs" in out and "2 run(s) done, 0 skipped, 2 failed" in out

    first.write_text('{"x": "kept"}')
    assert run_jobs(jobs[:1], workers=1) == [] and json.loads(first.read_text()) == {"x": "kept"}  # not rerun
    assert "skip first" in capsys.readouterr().out
    assert run_jobs(jobs[:1], workers=1, force=True) == [] and json.loads(first.read_text()) == {"x": 1}


def test_scheduler_workers_wait_for_what_they_read_and_survive_a_killed_worker(tmp_path, capsys):
    """Two spawned workers: a job reading another's JSON starts after it; a worker that dies without a word (as one
    killed for memory does) fails its run only, and the run that needs it is not started."""
    from granvit.experiments.schedule import Job, log_path, run_jobs

    first, dies = tmp_path / "first.json", tmp_path / "dies.json"
    jobs = [Job("first", first, dict, ({"x": 1},)), Job("dies", dies, os._exit, (3,)),
            Job("reads first", tmp_path / "reads.json", first.read_text, after=(first,)),
            Job("needs dies", tmp_path / "needs_dies.json", dict, after=(dies,))]
    failed = run_jobs(jobs, workers=2)
    assert [job.name for job in failed] == ["dies", "needs dies"]
    assert json.loads(json.loads((tmp_path / "reads.json").read_text())) == {"x": 1}  # first was whole when read
    assert log_path(jobs[0]).exists() and not dies.exists() and not (tmp_path / "needs_dies.json").exists()
    out = capsys.readouterr().out
    assert "FAILED dies after" in out and "(worker ended with code 3)" in out and "start first (log: " in out
