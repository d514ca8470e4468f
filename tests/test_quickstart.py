"""The main job end to end on a few images (`--smoke`): the paper's phases only, its outputs, and a checkpoint that
reproduces its own scores; the stage trainers leave their frozen parts bitwise unchanged."""

import json

import pytest
import torch
from granvit.train import quickstart
from granvit.train.recipe import load_recipe


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    result = quickstart.run_quickstart(["--smoke", "--out", str(out)])
    return out, result


def test_outputs_and_phases(smoke_run):
    out, result = smoke_run
    scores = json.loads((out / "scores.json").read_text())
    from granvit.train.runner import load_split

    regions = sum(len(row["regions"]) for row in load_split(out / "data", "test"))
    assert scores["num_regions"] == min(8, regions) and scores["num_images"] == 4  # eval.test_regions = 8 in --smoke
    assert scores["skipped"] == {}  # the synthetic set has no bad rows or regions
    # the paper's pipeline: stage 1 then stage 2, nothing that trains every part at once
    assert [e["phase"] for e in scores["curve"]["loss"]][-1] == "stage2"
    assert {e["phase"] for e in scores["curve"]["loss"]} == {"stage1", "stage2"}
    assert any("distill_loss" in e for e in scores["curve"]["loss"] if e["phase"] == "stage1")
    # the shipped parts, loaded (not trained) and reported with their hash and figures
    from granvit.train.parts import shipped_part

    assert set(scores["parts"]) == {"siglip", "lm"} and "retrieval_top1" in scores["parts"]["siglip"]
    assert "perplexity" in scores["parts"]["lm"] and "text_task_exact" in scores["parts"]["lm"]
    assert all(scores["parts"][name]["hash"] == shipped_part(name)[1]["hash"] for name in ("siglip", "lm"))
    assert {"grounding_acc50_unconstrained", "grounding_acc50", "caption_exact_baseline"} <= set(scores)
    # the effective recipe reloads as the same recipe
    assert load_recipe(out / "recipe.yaml") == scores["recipe"]
    for png in ("loss_curve.png", "boxes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "checkpoint" / "examples" / "examples.json").read_text())


def test_checkpoint_loads_with_remote_code_and_reproduces_predictions(smoke_run):
    from granvit.eval.run import evaluate_synthetic
    from granvit.train.runner import load_split
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, result = smoke_run
    model = AutoModelForImageTextToText.from_pretrained(out / "checkpoint", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out / "checkpoint", trust_remote_code=True)
    assert type(model).__name__ == "GranViTForConditionalGeneration"
    # the recipe's short prompts, box format and 32 bins travel with the checkpoint; so do the tasks it learned
    assert processor.caption2bbox_template == "find {caption}" and processor.num_coord_bins == 32
    assert processor.box_format == model.config.box_format == "tokens"
    assert model.config.trained_tasks == ["bbox2caption", "caption2bbox"]
    scores = evaluate_synthetic(model, processor, load_split(out / "data", "test"), limit=8, batch_size=64,
                                baseline_box=[0.1, 0.1, 0.5, 0.5], baseline_caption="x")
    assert scores["examples"] == result["examples"]  # greedy predictions of the saved model == the trained one's
    assert scores["grounding_acc50"] == result["grounding_acc50"]
    assert scores["caption_exact"] == result["caption_exact"]


def test_frozen_parts_unchanged_by_the_stages(smoke_run, tmp_path):
    """Stage 1 leaves the LLM bitwise unchanged (the LM part has its own box-token rows) and trains the ViT; stage 2
    leaves the ViT unchanged and trains the LLM."""
    from granvit import GranViTForConditionalGeneration, GranViTProcessor
    from granvit.train.runner import RunState, load_split, run_phase

    out, _ = smoke_run
    recipe = load_recipe(out / "recipe.yaml", [f"output_dir={tmp_path}"])
    model = GranViTForConditionalGeneration.from_pretrained(out / "build")
    processor = GranViTProcessor.from_pretrained(out / "build")
    train = load_split(out / "data", "train")

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    llm, vit = snapshot(model.model.language_model), snapshot(model.model.vision_tower)
    model, _ = run_phase(recipe, "stage1", model, processor, train, RunState())
    after = model.model.language_model.state_dict()
    # the LM part already reads its own box tokens: stage 1 leaves every LLM weight as it was, their rows included
    assert all(torch.equal(v, after[k]) for k, v in llm.items())
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vit.items())

    vit = snapshot(model.model.vision_tower)
    model, _ = run_phase(recipe, "stage2", model, processor, train, RunState())
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vit.items())
    assert any(not torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in llm.items())


def test_step_scale_scales_every_phase_and_part():
    from granvit.train.recipe import CONFIGS

    recipe = load_recipe(quickstart.CONFIG)
    quickstart.scale_steps(recipe, 0.5)
    default = load_recipe(quickstart.CONFIG)
    for name, phase in recipe["phases"].items():
        assert phase["training"]["max_steps"] == round(default["phases"][name]["training"]["max_steps"] / 2)
    tiny = load_recipe(CONFIGS / "cli_tiny_cpu.yaml")  # parts trained by the recipe itself (pretrain) scale too
    quickstart.scale_steps(tiny, 0.5)
    assert tiny["parts"]["lm"]["steps"] == round(load_recipe(CONFIGS / "cli_tiny_cpu.yaml")["parts"]["lm"]["steps"] / 2)


# The smoke main job's numbers, pinned (transformers' `expected_slice` style): a change that alters what the main job
# trains or how it scores fails here even when every range check still passes. One process, one thread, bf16 autocast
# in eager attention on this project's CPU; a deliberate change updates them (print them from scores.json).
PINNED_LOSSES = [("stage1", 1, 6.155682563781738), ("stage1", 2, 6.163329124450684),
                 ("stage2", 3, 2.691993236541748), ("stage2", 4, 2.7001712322235107)]
PINNED_SCORES = {"grounding_acc50": 0.0, "caption_exact": 0.0, "grounding_miou": 0.12520140410751712}


def test_pinned_numbers(smoke_run):
    out, _ = smoke_run
    scores = json.loads((out / "scores.json").read_text())
    losses = [(e["phase"], e["step"], e["loss"]) for e in scores["curve"]["loss"]]
    assert [(p, s) for p, s, _ in losses] == [(p, s) for p, s, _ in PINNED_LOSSES]
    assert [v for *_, v in losses] == pytest.approx([v for *_, v in PINNED_LOSSES], rel=1e-5)
    assert {k: scores[k] for k in PINNED_SCORES} == pytest.approx(PINNED_SCORES, abs=1e-6)
