"""granvit-train configs: every YAML builds valid TrainingArguments for every stage, the paper recipe's arithmetic,
the accelerate launch configs, and the DeepSpeed JSONs (pydantic-validated when deepspeed is installed)."""
import json
from pathlib import Path

import pytest
import yaml
from granvit.train.cli import load_config
from granvit.train.trainers import GranViTTrainingArguments

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"
CLI_CONFIGS = ["cli_tiny_cpu.yaml", "paper_siglip2_qwen2.5_1.5b.yaml"]
ACCELERATE = CONFIGS / "accelerate"

# DeepSpeed 0.19 config keys used by these files (deepspeed.ai/docs/config-json); the pydantic check below is stricter.
DS_TOP_KEYS = {"bf16", "fp16", "zero_optimization", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
               "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown", "optimizer", "scheduler"}
DS_ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
                "allgather_bucket_size", "allgather_partitions", "offload_optimizer", "offload_param", "round_robin_gradients",
                "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save", "sub_group_size"}


@pytest.mark.parametrize("name", CLI_CONFIGS)
@pytest.mark.parametrize("stage", ["1", "2", "sft"])
def test_configs_build_training_arguments(name, stage, tmp_path):
    config = load_config(str(CONFIGS / name), stage, [f"output_dir={tmp_path}", "training.use_cpu=true"])
    args = GranViTTrainingArguments(output_dir=str(tmp_path / "out"), **config["training"])
    assert args.remove_unused_columns is False  # the stage-1 crops and boxes must reach the collator
    if stage != "1":
        assert config["model"]["checkpoint"] == f"{tmp_path}/stage{'2' if stage == 'sft' else '1'}/final"


def test_paper_recipe_arithmetic():
    config = load_config(str(CONFIGS / "paper_siglip2_qwen2.5_1.5b.yaml"), "1")
    t = config["training"]
    gpus = yaml.safe_load((ACCELERATE / "ddp.yaml").read_text())["num_processes"]
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * gpus == 256
    assert (t["learning_rate"], t["num_train_epochs"], t["distill_lambda"], t["ema_decay"]) == (1e-5, 1, 1.0, 0.9)
    assert t["optim"].startswith("adamw") and t["bf16"] is True


def test_overrides_beat_the_stage_section(tmp_path):
    config = load_config(str(CONFIGS / "cli_tiny_cpu.yaml"), "1", ["training.learning_rate=0.5", "stage1.data.seed=7"])
    assert config["training"]["learning_rate"] == 0.5  # stage1.training.learning_rate is 1e-3 in the file
    assert config["data"]["seed"] == 7
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(str(CONFIGS / "cli_tiny_cpu.yaml"), "1", ["trainig.max_steps=3"])


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
