"""The ablation scripts end to end on their smoke preset (a few steps, one seed), and their recipe plumbing."""

import json

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
    assert staged["model"]["vision"] == "embedded" and "parts" not in staged  # the seed never moves the shipped parts


def test_smoke_runs_every_claim_and_aggregates(tmp_path):
    main(["--claim", "stages", "distill", "data", "--seeds", "0", "--smoke", "--out", str(tmp_path), "--threads", "1"])
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
