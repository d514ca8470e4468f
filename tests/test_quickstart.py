"""The main job end to end on a few images (`--smoke`): outputs exist and the checkpoint reproduces its own scores."""

import dataclasses
import json

import pytest
import torch
from granvit.train import quickstart


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    result = quickstart.run(["--smoke", "--out", str(out)])
    return out, result


def test_outputs_and_scores(smoke_run):
    out, _ = smoke_run
    scores = json.loads((out / "scores.json").read_text())
    for key in ("grounding_acc50", "grounding_acc50_baseline", "caption_exact", "caption_exact_baseline"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["timings"]["total_s"] > 0
    assert scores["skipped"] == {}  # the synthetic set has no bad rows or regions
    # every phase ran through its Trainer and left loss points on the curve
    assert {e["phase"] for e in scores["curve"]["loss"]} == {"warmup", "stage1", "stage2"}
    assert any("distill_loss" in e for e in scores["curve"]["loss"] if e["phase"] == "stage1")
    # the effective recipe reloads as the same recipe
    smoke = quickstart.load_recipe(quickstart.CONFIG, quickstart.SMOKE)
    assert dataclasses.asdict(quickstart.load_recipe(out / "recipe.yaml")) == dataclasses.asdict(smoke)
    for png in ("loss_curve.png", "boxes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loads_with_remote_code_and_reproduces_predictions(smoke_run):
    from granvit.eval.run import evaluate_synthetic
    from granvit.train.quickstart import load_split
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, result = smoke_run
    model = AutoModelForImageTextToText.from_pretrained(out / "checkpoint", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out / "checkpoint", trust_remote_code=True)
    assert type(model).__name__ == "GranViTForConditionalGeneration"
    # the recipe's short prompts and 32 bins travel with the checkpoint
    assert processor.caption2bbox_template == "find {caption}" and processor.num_coord_bins == 32
    scores = evaluate_synthetic(model, processor, load_split(out / "data", "test"), batch_size=64,
                                baseline_box=[0.1, 0.1, 0.5, 0.5], baseline_caption="x")
    assert scores["examples"] == result["examples"]  # greedy predictions of the saved model == the trained one's
    assert scores["grounding_acc50"] == result["grounding_acc50"]
    assert scores["caption_exact"] == result["caption_exact"]


def test_frozen_parts_unchanged_by_stage_trainers(tmp_path):
    """Stage 1 leaves the LLM bitwise unchanged; stage 2 leaves the ViT unchanged (the trainers' masks hold here)."""
    from granvit.train.data.synth import generate_record

    recipe = quickstart.load_recipe(quickstart.CONFIG, quickstart.SMOKE)
    rows = [generate_record(quickstart.synth_config(recipe), 0, "train", i) for i in range(6)]
    captions = [reg["caption"] for row in rows for reg in row["regions"]]
    model, processor = quickstart.build_model(recipe, tmp_path, captions)
    store = quickstart.QueryStore(rows, processor, crops=True)
    curve = {"loss": [], "val": []}

    def snapshot(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    llm, vit = snapshot(model.model.language_model), snapshot(model.model.vision_tower)
    quickstart.run_phase("stage1", model, processor, store, recipe, tmp_path, 0, curve, None)
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in llm.items())
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vit.items())

    vit = snapshot(model.model.vision_tower)
    quickstart.run_phase("stage2", model, processor, store, recipe, tmp_path, 2, curve, None)
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vit.items())
    assert any(not torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in llm.items())


def test_recipe_overrides_and_unknown_keys():
    # the YAML and the dataclass defaults describe the same recipe
    assert dataclasses.asdict(quickstart.load_recipe(quickstart.CONFIG)) == dataclasses.asdict(quickstart.Recipe())
    recipe = quickstart.load_recipe(quickstart.CONFIG, ["stage1.steps=7", "lr_llm=3e-4"])
    # an override of one phase field keeps the phase's other recipe values (stage 1 stays Bbox2Caption only)
    assert recipe.stage1.steps == 7 and recipe.stage1.caption2bbox == 0.0 and recipe.stage1.lr_scale == 0.3
    assert recipe.lr_llm == 3e-4
    with pytest.raises(ValueError, match="lr_llmm"):
        quickstart.load_recipe(quickstart.CONFIG, ["lr_llmm=1"])
    with pytest.raises(ValueError, match="stepz"):
        quickstart.load_recipe(quickstart.CONFIG, ["stage1.stepz=1"])


def test_minutes_scale_every_phase():
    recipe = quickstart.load_recipe(quickstart.CONFIG, ["stage1.steps=0"])
    quickstart.scale_steps(recipe, recipe.minutes / 2)
    assert (recipe.warmup.steps, recipe.stage1.steps, recipe.stage2.steps) == (600, 0, 175)
