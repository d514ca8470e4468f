"""granvit-train end to end in-process: stage 1 then LoRA stage 2 from the smoke config, outputs that load back, the
stage-2 task mix, and resume skipping a checkpoint that a crash left half-written."""
from pathlib import Path

import torch
from granvit import GranViTForConditionalGeneration
from granvit.train.cli import keep_fraction, last_complete_checkpoint, load_config, run
from safetensors.torch import load_file

CONFIG = str(Path(__file__).resolve().parent.parent / "train" / "configs" / "cli_tiny_cpu.yaml")


def test_stage1_then_lora_stage2(tmp_path):
    common = [f"output_dir={tmp_path}", "data.synthetic.train=8", "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1",
              "training.disable_tqdm=true"]
    trainer = run(load_config(CONFIG, "1", common), "1")
    stage1 = tmp_path / "stage1"
    assert {"loss", "caption_loss", "distill_loss"} <= set(trainer.state.log_history[0])
    assert (stage1 / "checkpoint-2" / "ema_teacher.safetensors").is_file()
    teacher = load_file(stage1 / "ema_teacher.safetensors")
    assert all(torch.equal(teacher[k], v) for k, v in trainer.teacher.state_dict().items())
    first = GranViTForConditionalGeneration.from_pretrained(stage1 / "final")
    trained_tower = trainer.model.model.vision_tower.state_dict()
    assert all(torch.equal(v, trained_tower[k]) for k, v in first.model.vision_tower.state_dict().items())

    trainer = run(load_config(CONFIG, "2", [*common, "training.lora_r=4"]), "2")
    stage2 = tmp_path / "stage2"
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    merged = GranViTForConditionalGeneration.from_pretrained(stage2 / "final")
    assert not any("lora" in name for name in merged.state_dict())
    # stage 2 started from stage 1's output and kept its (frozen) vision tower
    assert all(torch.equal(v, trained_tower[k]) for k, v in merged.model.vision_tower.state_dict().items())
    changed = [not torch.equal(v, first.state_dict()[k]) for k, v in merged.state_dict().items() if "language_model" in k]
    assert any(changed)


def test_last_complete_checkpoint_skips_a_partial_one(tmp_path):
    for step, files in ((4, ["trainer_state.json", "ema_teacher.safetensors"]), (8, ["trainer_state.json"]), (12, ["model.safetensors"])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert last_complete_checkpoint(str(tmp_path), "1") == str(tmp_path / "checkpoint-4")  # 8 lacks the teacher
    assert last_complete_checkpoint(str(tmp_path), "2") == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(str(tmp_path / "checkpoint-12"), "2") is None


def test_bbox2caption_mix_ratio():
    examples = [{"image_id": f"img{i}", "prompt": f"p{i}"} for i in range(4000)]
    kept = sum(keep_fraction(e, 0.25, seed=0) for e in examples) / len(examples)
    assert abs(kept - 0.25) < 0.03
    assert [keep_fraction(e, 0.25, 0) for e in examples[:50]] == [keep_fraction(e, 0.25, 0) for e in examples[:50]]
    assert [keep_fraction(e, 0.25, 0) for e in examples[:200]] != [keep_fraction(e, 0.25, 1) for e in examples[:200]]
