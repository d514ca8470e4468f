"""granvit-train end to end in-process: stage 1 then LoRA stage 2 from the smoke recipe, outputs that load back,
the stage-2 task mix, and resume skipping a checkpoint that a crash left half-written."""
from pathlib import Path

import pytest
import torch
from granvit import GranViTForConditionalGeneration
from granvit.console import UserError
from granvit.train.cli import phases_to_run
from granvit.train.data.tasks import TaskBuilder
from granvit.train.recipe import load_recipe
from granvit.train.runner import last_complete_checkpoint, run
from safetensors.torch import load_file

CONFIG = str(Path(__file__).resolve().parent.parent / "train" / "configs" / "cli_tiny_cpu.yaml")


def test_stage1_then_lora_stage2(tmp_path):
    common = [f"output_dir={tmp_path}", "data.sizes.train=8", "training.max_steps=2", "training.save_steps=2",
              "training.logging_steps=1", "training.disable_tqdm=true"]
    recipe = load_recipe(CONFIG, common)
    model, _, state, _ = run(recipe, only=phases_to_run(recipe, "1", None))
    stage1 = tmp_path / "stage1"
    assert {"loss", "caption_loss", "distill_loss"} <= set(state.curve["loss"][0])
    assert (stage1 / "checkpoint-2" / "ema_teacher.safetensors").is_file()
    # its config names the regions pipeline, and the Trainer's checkpoint ships its file (as save_granvit's final does)
    assert (stage1 / "checkpoint-2" / "pipeline_granvit.py").is_file() and (stage1 / "final" / "pipeline_granvit.py").is_file()
    assert (stage1 / "ema_teacher.safetensors").is_file() and load_file(stage1 / "ema_teacher.safetensors")
    first = GranViTForConditionalGeneration.from_pretrained(stage1 / "final")
    assert first.config.trained_tasks == ["bbox2caption"]
    trained_tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(v, trained_tower[k]) for k, v in first.model.vision_tower.state_dict().items())

    recipe = load_recipe(CONFIG, [*common, "phases.stage2.training.lora_r=4"])
    run(recipe, only=phases_to_run(recipe, "2", None))
    stage2 = tmp_path / "stage2"
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    merged = GranViTForConditionalGeneration.from_pretrained(stage2 / "final")
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.config.trained_tasks == ["bbox2caption", "caption2bbox"]
    # stage 2 started from stage 1's output and kept its (frozen) vision tower
    assert all(torch.equal(v, trained_tower[k]) for k, v in merged.model.vision_tower.state_dict().items())
    changed = [not torch.equal(v, first.state_dict()[k]) for k, v in merged.state_dict().items() if "language_model" in k]
    assert any(changed)


def test_stage_and_phase_selection(tmp_path):
    recipe = load_recipe(CONFIG, [f"output_dir={tmp_path}"])
    assert phases_to_run(recipe, "1", None) == ["stage1"] and phases_to_run(recipe, None, "stage2") == ["stage2"]
    with pytest.raises(UserError, match="no phase of stage 'sft'"):
        phases_to_run(recipe, "sft", None)
    with pytest.raises(UserError, match="unknown key"):
        load_recipe(CONFIG, ["trainig.max_steps=3"])
    with pytest.raises(UserError, match=r"phases.stage1.training"):
        load_recipe(CONFIG, ["phases.stage1.training.max_stepz=3"])


def test_last_complete_checkpoint_skips_a_partial_one(tmp_path):
    for step, files in ((4, ["trainer_state.json", "ema_teacher.safetensors"]), (8, ["trainer_state.json"]), (12, ["model.safetensors"])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert last_complete_checkpoint(str(tmp_path), "1") == str(tmp_path / "checkpoint-4")  # 8 lacks the teacher
    assert last_complete_checkpoint(str(tmp_path), "2") == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(str(tmp_path / "checkpoint-12"), "2") is None


def test_task_share_is_a_seeded_coin(tiny_model_and_processor):
    from granvit.train.data.synth import SynthConfig, generate_record

    processor = tiny_model_and_processor[1]
    records = [generate_record(SynthConfig(image_size=64, ocr_fraction=0.0), 0, "train", i) for i in range(120)]
    regions = sum(len(r["regions"]) for r in records)
    mixed = TaskBuilder(processor, tasks={"caption2bbox": 1.0, "bbox2caption": 0.25}, regions_per_image=99)
    tasks = [e["task"] for e in mixed.iter_examples(records)]
    assert abs(tasks.count("bbox2caption") / regions - 0.25) < 0.06
    again = [e["task"] for e in TaskBuilder(processor, tasks={"caption2bbox": 1.0, "bbox2caption": 0.25},
                                              regions_per_image=99).iter_examples(records)]
    assert tasks == again  # the same coins every time (resume, every epoch)
