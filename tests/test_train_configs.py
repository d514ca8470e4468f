"""Training recipes: every YAML builds valid TrainingArguments for every phase, the paper recipe's arithmetic, the
accelerate launch configs, and the DeepSpeed JSONs (pydantic-validated when deepspeed is installed)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from granvit.console import UserError
from granvit.train.recipe import load_recipe, phase_training
from granvit.train.trainers import GranViTTrainingArguments

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"
RECIPES = ["cli_tiny_cpu.yaml", "quickstart.yaml", "paper_siglip2_qwen2.5_1.5b.yaml"]
ACCELERATE = CONFIGS / "accelerate"

# DeepSpeed 0.19 config keys used by these files (deepspeed.ai/docs/config-json); the pydantic check below is stricter.
DS_TOP_KEYS = {"bf16", "fp16", "zero_optimization", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
               "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown", "optimizer", "scheduler"}
DS_ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
                "allgather_bucket_size", "allgather_partitions", "offload_optimizer", "offload_param", "round_robin_gradients",
                "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save", "sub_group_size"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_build_training_arguments_for_every_phase(name, tmp_path):
    recipe = load_recipe(CONFIGS / name, [f"output_dir={tmp_path}", "data.path=/data/gran", "training.use_cpu=true",
                                          "training.bf16=false"])
    assert [p["stage"] for p in recipe["phases"].values()][:2] == ["1", "2"]  # the paper's order
    for phase in recipe["phases"]:
        args = GranViTTrainingArguments(output_dir=str(tmp_path / phase), **phase_training(recipe, phase))
        assert args.remove_unused_columns is False  # the stage-1 crops and boxes must reach the collator


def test_paper_recipe_arithmetic():
    recipe = load_recipe(CONFIGS / "paper_siglip2_qwen2.5_1.5b.yaml", ["data.path=/data/gran"])
    t = recipe["training"]
    gpus = yaml.safe_load((ACCELERATE / "ddp.yaml").read_text())["num_processes"]
    queries = recipe["data"]["regions_per_image"]
    assert t["per_device_train_batch_size"] * queries * t["gradient_accumulation_steps"] * gpus == 256
    assert (t["learning_rate"], t["distill_lambda"], t["ema_decay"]) == (1e-5, 1.0, 0.9)
    assert t["optim"].startswith("adamw") and t["bf16"] is True
    assert recipe["model"]["box_format"] == "tokens" and recipe["model"]["num_coord_bins"] == 1000
    assert recipe["phases"]["stage1"]["training"]["train_new_token_rows"] is True


def test_overrides_and_unknown_keys(tmp_path):
    recipe = load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["training.learning_rate=0.5", "phases.stage2.training.max_steps=7"])
    assert phase_training(recipe, "stage2")["learning_rate"] == 0.5 and phase_training(recipe, "stage2")["max_steps"] == 7
    assert phase_training(recipe, "stage1")["learning_rate"] == 1e-3  # the phase's own value beats the recipe's
    with pytest.raises(UserError, match="unknown key"):
        load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["trainig.max_steps=3"])
    with pytest.raises(UserError, match="stage must be one of"):
        load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["phases.stage1.stage=3"])
    with pytest.raises(UserError, match="box_format"):
        load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["model.box_format=digits"])
    # YAML 1.1 reads 1e-3 as text; an override means the number
    assert phase_training(load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["training.learning_rate=1e-4"]), "stage2")[
        "learning_rate"] == 1e-4
    # and reads no / off as False; only true / false are booleans
    saving = load_recipe(CONFIGS / "cli_tiny_cpu.yaml", ["training.save_strategy=no", "training.bf16=false"])
    assert (saving["training"]["save_strategy"], saving["training"]["bf16"]) == ("no", False)
    with pytest.raises(UserError, match="a parts section is for model.vision / model.llm: pretrain"):
        load_recipe(CONFIGS / "quickstart.yaml", ["parts.lm.steps=3"])


def test_text_box_format_override_carries_its_dependent_settings():
    """The README's `--set model.box_format=text` on the main job's recipe: token-only settings follow the switch."""
    recipe = load_recipe(CONFIGS / "quickstart.yaml", ["model.box_format=text"])
    for phase in recipe["phases"]:
        training = phase_training(recipe, phase)
        assert training.get("soft_coord_sigma", 0) == 0 and not training.get("train_new_token_rows", False)
    tokens = load_recipe(CONFIGS / "quickstart.yaml")
    assert phase_training(tokens, "stage2")["soft_coord_sigma"] > 0  # untouched in the tokens format


def test_every_core_splits_the_batch_not_the_recipe(monkeypatch):
    from granvit.train import launch

    recipe = load_recipe(CONFIGS / "quickstart.yaml")
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    assert launch.planned_processes(recipe) == 2 and launch.planned_processes({**recipe, "processes": 1}) == 1
    assert launch.planned_processes(load_recipe(CONFIGS / "cli_tiny_cpu.yaml")) == 1  # the smoke recipes: one
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.split_batch(8) == 8  # a launch made elsewhere (torchrun, accelerate): per device, as HF means it
    monkeypatch.setenv(launch.SPLIT_ENV, "1")
    assert launch.split_batch(8) == 4  # a launch made here: the recipe's batch is the global one
    with pytest.raises(UserError, match="does not split over 3 processes"):
        launch.check_batches(recipe, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_worker_dies_with_its_parent():
    """A parent starts a child that calls die_with_parent, prints the child's pid and is SIGKILLed: the child must not
    outlive it (torch.distributed.run's workers run in sessions of their own; a killed launch must take them along)."""
    child = ("from granvit.train.launch import die_with_parent; import time; die_with_parent(); "
             "print('armed', flush=True); time.sleep(60)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "armed"  # the child shares the pipe; it is alive while its parent is
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():  # dead, not yet reaped
                return
        except FileNotFoundError:  # gone
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the child outlived its SIGKILLed parent")


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_configs(name):
    cfg = yaml.safe_load((ACCELERATE / name).read_text())
    assert cfg["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert cfg["num_processes"] >= 2 and cfg["use_cpu"] is False
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_file = Path(cfg["deepspeed_config"]["deepspeed_config_file"])
        assert (CONFIGS.parent.parent / ds_file).is_file(), ds_file  # relative to the repository root
        stage = json.loads((CONFIGS.parent.parent / ds_file).read_text())["zero_optimization"]["stage"]
        assert name == f"deepspeed_zero{stage}.yaml"
    if cfg["distributed_type"] == "FSDP":
        assert cfg["fsdp_config"]["fsdp_version"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_keys(stage):
    cfg = json.loads((ACCELERATE / f"ds_zero{stage}.json").read_text())
    assert set(cfg) <= DS_TOP_KEYS, set(cfg) - DS_TOP_KEYS
    assert set(cfg["zero_optimization"]) <= DS_ZERO_KEYS, set(cfg["zero_optimization"]) - DS_ZERO_KEYS
    assert cfg["zero_optimization"]["stage"] == stage
    # "auto" everywhere the Trainer knows the value, so the JSON can never disagree with TrainingArguments
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_validates_with_deepspeed(stage, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed: only the documented-keys check ran")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = ACCELERATE / f"ds_zero{stage}.json"
    cfg = json.loads(path.read_text())
    zero = {k: v for k, v in cfg["zero_optimization"].items() if v != "auto"}  # "auto" is filled in by transformers
    assert DeepSpeedZeroConfig(**zero).stage == stage  # pydantic: unknown keys / wrong types raise
    with pytest.raises(Exception, match="not_a_key|extra"):
        DeepSpeedZeroConfig(**zero, not_a_key=1)
    args = GranViTTrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), per_device_train_batch_size=8,
                                    gradient_accumulation_steps=4)
    assert isinstance(args.hf_deepspeed_config, HfTrainerDeepSpeedConfig)
