"""The typed recipe (train/recipe.py): every default filled in from one place, an unknown or mistyped key refused in
one line that names it (and the nearest valid key), settings that contradict each other refused when the recipe
loads, and every override the README and EXPERIMENTS.md show loads and passes those checks."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from granvit.console import UserError
from granvit.train import quickstart
from granvit.train.recipe import CONFIGS, Recipe, load_recipe, phase_setting, section

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "parts.yaml")
TOP_KEYS = {f.name for f in dataclasses.fields(Recipe)}


def refused(path, overrides) -> str:
    with pytest.raises(UserError) as error:
        load_recipe(path, overrides)
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_with_every_default_filled_in(name):
    recipe = load_recipe(CONFIGS / name, ["data.path=/data/gran"])
    assert set(recipe) == TOP_KEYS
    for key in ("data", "model", "eval"):
        assert set(recipe[key]) == set(section(key))  # no key left to a `.get(key, default)` somewhere
    for phase in recipe["phases"].values():
        assert set(phase) == {"stage", "tasks", "training"} and isinstance(phase["stage"], str)
    assert set(recipe["data"]["splits"]) == {"train", "val", "test"}


def test_defaults_come_from_the_dataclasses(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("data: {sizes: {train: 8}}\nmodel: {vision: embedded, llm: embedded}\n"
                    "phases: {stage1: {stage: 1, tasks: {bbox2caption: 1.0}}}\n")
    recipe = load_recipe(path)
    assert (recipe["seed"], recipe["threads"], recipe["processes"], recipe["output_dir"]) == (0, 0, "auto", "runs/granvit")
    assert recipe["data"]["regions_per_image"] == 4 and recipe["data"]["multi_box"] is True
    assert recipe["model"]["box_format"] == "tokens" and recipe["model"]["num_coord_bins"] is None
    assert recipe["eval"] == {"every": None, "val_regions": None, "test_regions": None, "batch_size": 64,
                              "probe_images": None}
    assert recipe["phases"]["stage1"]["stage"] == "1"  # an unquoted stage is the stage's name
    assert phase_setting(recipe, "stage1", "per_device_train_batch_size") == 8  # the arguments class's default
    assert section("model", {"checkpoint": "ckpt"})["vision"] is None


def test_unknown_keys_are_refused_with_the_nearest_key(tmp_path):
    recipe = CONFIGS / "quickstart.yaml"
    assert refused(recipe, ["data.regions_per_imgae=3"]).endswith(
        "unknown key 'data.regions_per_imgae'; did you mean 'regions_per_image'?")
    assert "unknown key 'trainig'; did you mean 'training'?" in refused(recipe, ["trainig.max_steps=3"])
    assert "did you mean 'max_steps'?" in refused(recipe, ["phases.stage2.training.max_stepz=3"])
    assert "did you mean 'caption2bbox'?" in refused(recipe, ["phases.stage2.tasks.caption2box=1.0"])
    assert "did you mean 'colours'?" in refused(recipe, ["data.synth.colour=[red]"])
    assert "did you mean 'steps'?" in refused(CONFIGS / "cli_tiny_cpu.yaml", ["parts.lm.stepz=3"])
    misspelt = tmp_path / "misspelt.yaml"  # in the file, not an override
    misspelt.write_text((CONFIGS / "quickstart.yaml").read_text().replace("probe_images:", "probe_imgs:"))
    assert f"{misspelt}: unknown key 'eval.probe_imgs'; did you mean 'probe_images'?" == refused(misspelt, [])


def test_wrong_types_are_refused_naming_the_key_and_the_type():
    recipe = CONFIGS / "quickstart.yaml"
    assert refused(recipe, ["data.sizes.train=abc"]).endswith("data.sizes.train: 'abc' is not an integer")
    assert refused(recipe, ["seed=1.5"]).endswith("seed: 1.5 is not an integer")
    assert refused(recipe, ["data.streaming=maybe"]).endswith("data.streaming: 'maybe' is not true or false")
    assert refused(recipe, ["eval=3"]).endswith("eval: 3 is not a mapping")
    assert "parts.lm.steps: 'abc' is not an integer" in refused(CONFIGS / "cli_tiny_cpu.yaml", ["parts.lm.steps=abc"])
    assert load_recipe(recipe, ["data.synth=null"])["data"]["synth"] == {}  # a mapping's null is its default


@pytest.mark.parametrize("config, overrides, message", [
    ("quickstart.yaml", ["training.lora_r=16"], "phases.stage1 (stage 1): lora_r=16: LoRA adapts the language model"),
    ("quickstart.yaml", ["phases.stage2.training.train_new_token_rows=true"], "stage 2 trains the whole language model"),
    ("quickstart.yaml", ["model.num_coord_bins=64"], "the embedded LM part reads 32 coordinate tokens"),
    ("quickstart.yaml", ["phases.stage1.tasks.caption2bbox_negative=0.2"], "no region for stage 1's distillation"),
    ("quickstart.yaml", ["phases.stage2.tasks.caption2bbox=1.5"], "shares are in [0, 1]"),
    ("quickstart.yaml", ["data.synth.num_sizes=5"], "data.synth: num_sizes must be 1, 2 or 3"),
    ("quickstart.yaml", ["processes=0"], "processes must be 'auto' or a positive number"),
    ("quickstart.yaml", ["training.distill_feature_norm=batch"], "distill_feature_norm must be"),
    ("cli_tiny_cpu.yaml", ["parts.lm.num_coord_bins=64", "model.box_format=tokens"],
     "model.num_coord_bins=100, but the pretrain LM part reads 64 coordinate tokens"),
    ("grpo_quickstart.yaml", ["phases.grpo.training.use_vllm=true"], "use_vllm=True: vLLM has no GranViT model"),
    ("grpo_quickstart.yaml", ["phases.grpo.tasks.bbox2caption=1.0"], "its tasks must be {caption2bbox: 1.0}"),
    ("grpo_quickstart.yaml", ["data.streaming=true"], "the grpo stage reads map-style data"),
])
def test_settings_that_contradict_each_other_are_refused_at_load(config, overrides, message):
    assert message in refused(CONFIGS / config, overrides)


def test_a_text_checkpoint_refuses_token_only_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"box_format": "text"}))
    message = refused(CONFIGS / "quickstart.yaml", [f"model.checkpoint={tmp_path}", "phases.stage1.training.train_new_token_rows=true"])
    assert "train_new_token_rows needs box_format tokens" in message
    message = refused(CONFIGS / "quickstart.yaml", [f"model.checkpoint={tmp_path}"])
    assert "phases.stage1 (stage 1): soft_coord_sigma needs box_format tokens" in message


def test_the_text_box_format_carries_its_dependent_settings():
    """The README's `--set model.box_format=text` on the main job's recipe: token-only settings follow the switch."""
    for config in ("quickstart.yaml", "paper_siglip2_qwen2.5_1.5b.yaml"):
        recipe = load_recipe(CONFIGS / config, ["model.box_format=text", "data.path=/data/gran"])
        for name in recipe["phases"]:
            assert not phase_setting(recipe, name, "soft_coord_sigma")
            assert not phase_setting(recipe, name, "train_new_token_rows")


def documented_overrides() -> list[tuple[str, list[str], str]]:
    """(recipe file, overrides, where) of every command or code span in README.md and EXPERIMENTS.md that sets a
    recipe key: `--set key=value` and `key=value` words; the recipe is the command's --config, else the main job's."""
    found = []
    for doc in ("README.md", "EXPERIMENTS.md"):
        text = (REPO / doc).read_text().replace("\\\n", " ")  # a command continued on the next line
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))  # may wrap a line
        spans = [line for block in blocks for line in block.splitlines()] + inline
        for span in spans:
            words = [w for w in span.split() if re.fullmatch(r"[a-z_0-9]+(\.[a-z_0-9]+)+=\S+|(seed|threads|processes)=\S+", w)
                     and w.partition("=")[0].split(".")[0] in TOP_KEYS]
            if words:
                config = re.search(r"--config (\S+\.yaml)", span)
                found.append((config.group(1).split("/")[-1] if config else "quickstart.yaml", words, doc))
    return found


def test_the_docs_show_overrides():
    shown = {word for _, words, _ in documented_overrides() for word in words}
    assert {"model.box_format=text", "processes=1", "training.resume_from_checkpoint=true",
            "phases.stage2.tasks.caption2bbox_negative=0.2"} <= shown


@pytest.mark.parametrize("config, overrides, where", documented_overrides(), ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_every_documented_override_loads_and_passes_the_checks(config, overrides, where):
    recipe = load_recipe(CONFIGS / config, ["data.path=/data/gran"] * ("paper" in config) + overrides)
    for override in overrides:
        key, _, value = override.partition("=")
        assert str(value_at(recipe, key)).lower() == value.lower() or value_at(recipe, key) == float(value), where


def value_at(recipe: dict, dotted: str):
    for part in dotted.split("."):
        recipe = recipe[part]
    return recipe


@pytest.mark.parametrize("override", ["model.box_format=text", "processes=1"])
def test_quickstart_smoke_runs_with_each_documented_override(override, tmp_path):
    """What `granvit-quickstart --set ...` of the README runs, on the smoke sizes (seconds each)."""
    result = quickstart.run_quickstart(["--smoke", "--out", str(tmp_path), "--set", override])
    key, _, value = override.partition("=")
    assert str(value_at(result["recipe"], key)) == value and result["num_regions"] > 0
