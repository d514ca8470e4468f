"""The trl stages (train/trl_stages.py) offline on tiny models: SFT on trl's SFTTrainer and grounding GRPO on trl's
GRPOTrainer train what they should and leave the ViT bitwise unchanged; rewards equal eval/metrics.py's IoU; each
adapter, next to the trl behaviour that needs it; resume; the runner and `granvit-train --stage sft|grpo`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from granvit import GranViTForConditionalGeneration, GranViTProcessor
from granvit.eval.metrics import box_iou
from granvit.train.data.conversations import conversation, grounding_prompts, sft_items
from granvit.train.data.synth import SynthConfig, write_synth
from granvit.train.data.tasks import TaskBuilder, TaskCollator
from granvit.train.freezing import component_of
from granvit.train.rewards import BoxFormatReward, BoxIoUReward, grounding_rewards
from PIL import Image
from transformers import LogitsProcessorList, TrainerCallback
from granvit.train.trl_stages import (
    ConversationCollator,
    GranViTGRPOConfig,
    GranViTGRPOTrainer,
    GranViTSFTConfig,
    GranViTSFTTrainer,
    logits_processor_in_generate,
)

# trl's GRPOTrainer reads the deprecated `model.is_gradient_checkpointing` (transformers 5.24 warns)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
CONFIG = str(Path(__file__).resolve().parent.parent / "train" / "configs" / "trl_tiny_cpu.yaml")
COMMON = {"use_cpu": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
          "seed": 0}


@pytest.fixture(scope="module")
def gran(tmp_path_factory):
    """A small synthetic Gran folder (64 px, 1-3 objects) and its train split."""
    folder = tmp_path_factory.mktemp("gran")
    write_synth(str(folder), {"train": 12}, SynthConfig(image_size=64, min_objects=1, max_objects=3, ocr_fraction=0.0,
                                                        allow_duplicates=False), seed=0)
    return folder, load_dataset(str(folder), split="train")


def load(tiny_checkpoints, box_format="text"):
    checkpoint = tiny_checkpoints(box_format)
    return GranViTForConditionalGeneration.from_pretrained(checkpoint), GranViTProcessor.from_pretrained(checkpoint)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_vit_frozen_rest_trained(model, before, trained=("language_model",)):
    for name, param in model.named_parameters():
        component = component_of(name)
        if component == "vision_tower":
            assert torch.equal(param, before[name]), f"the frozen ViT changed: {name}"
    for component in trained:
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if component_of(n) == component)


def sft_trainer(model, processor, split, tmp_path, **overrides):
    builder = TaskBuilder(processor, tasks={"vqa": 1.0, "bbox2caption": 1.0, "caption2bbox": 1.0}, regions_per_image=2)
    kwargs = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3, **COMMON}
    args = GranViTSFTConfig(output_dir=str(tmp_path), **{**kwargs, **overrides})
    return GranViTSFTTrainer(model=model, args=args, train_dataset=sft_items(split, builder),
                             data_collator=ConversationCollator(processor=processor), processing_class=processor)


def grpo_trainer(model, processor, split, tmp_path, reward_funcs=None, **overrides):
    builder = TaskBuilder(processor, tasks={"caption2bbox": 1.0}, regions_per_image=1, multi_box=False)
    kwargs = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "learning_rate": 1e-3, **COMMON}
    args = GranViTGRPOConfig(output_dir=str(tmp_path), **{**kwargs, **overrides})
    return GranViTGRPOTrainer(model=model, args=args, train_dataset=grounding_prompts(split, builder),
                              processing_class=processor, reward_funcs=reward_funcs)


# ============================================================================================ SFT
def test_sft_trains_llm_keeps_vit(tiny_checkpoints, gran, tmp_path):
    model, processor = load(tiny_checkpoints)
    before = snapshot(model)
    trainer = sft_trainer(model, processor, gran[1], tmp_path)
    assert trainer.parameter_table["vision_tower"][0] == 0 and trainer.parameter_table["language_model"][0] > 0
    trainer.train()
    assert_vit_frozen_rest_trained(model, before, ("multi_modal_projector", "language_model", "lm_head"))
    assert trainer.state.log_history[0]["mean_token_accuracy"] is not None  # trl's own metrics still logged


@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_conversations_tokenize_as_the_stage_collator(tiny_checkpoints, gran, box_format):
    """One query = one conversation; trl's collator + assistant-only labels give exactly the ids, labels and pixels
    of the TaskCollator the other stages use (so SFT on region queries is stage 2's loss)."""
    _, processor = load(tiny_checkpoints, box_format)
    builder = TaskBuilder(processor, tasks={"vqa": 1.0, "bbox2caption": 1.0, "caption2bbox": 1.0}, regions_per_image=2)
    examples = builder.examples(gran[1][0])
    ours = ConversationCollator(processor=processor)([{"images": [examples[0]["image"]],
                                                       "conversations": [conversation(e) for e in examples]}])
    reference = TaskCollator(processor)(examples)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(ours[key], reference[key]), key


def test_user_conversations_multi_turn(tiny_checkpoints, gran):
    """Any dataset of trl conversations (messages + images) is used as it is; every assistant turn is trained."""
    _, processor = load(tiny_checkpoints)
    image = sft_items(gran[1], TaskBuilder(processor, tasks=("vqa",)))[0]["images"][0]
    messages = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "a star"},
                {"role": "user", "content": "and its colour?"}, {"role": "assistant", "content": "red"}]
    rows = Dataset.from_dict({"messages": [messages], "images": [[image]]})
    assert sft_items(rows, TaskBuilder(processor, tasks=("vqa",))) is rows
    batch = ConversationCollator(processor=processor)([rows[0]])
    labelled = [t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if lab != -100]
    eos = processor.tokenizer.eos_token_id
    expected = [t for text in ("a star", "red") for t in processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]]
    assert labelled == expected


def test_trl_assistant_only_loss_needs_what_granvit_processor_lacks(tiny_checkpoints, gran, tmp_path):
    """Why ConversationCollator exists: trl's assistant-only loss needs `{% generation %}` markers and token offsets
    from the processor; GranViTProcessor tokenizes itself and has neither."""
    model, processor = load(tiny_checkpoints)
    rows = sft_items(gran[1], TaskBuilder(processor, tasks=("vqa",)))
    with pytest.raises(ValueError, match="not training-compatible"):
        GranViTSFTTrainer(model=model, args=GranViTSFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **COMMON),
                          train_dataset=Dataset.from_list([{"messages": conversation({"prompt": "q", "target": "a"}),
                                                            "images": [rows[0]["images"][0]]}]),
                          processing_class=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": rows[0]["images"][0]}, {"type": "text", "text": "q"}]}]
    # the processor refuses trl's offset request by name (it names every keyword it does take)
    with pytest.raises(TypeError, match="return_offsets_mapping"):
        processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_resume_is_exact(tiny_checkpoints, gran, tmp_path, stage):
    """Killed after step 2 (its checkpoint saved), then resumed: the weights of an uninterrupted run, bitwise (GRPO:
    the same samples too, from the restored RNG state; the KL reference is the same starting model)."""
    make = sft_trainer if stage == "sft" else grpo_trainer
    straight, processor = load(tiny_checkpoints)
    make(straight, processor, gran[1], tmp_path / "a", max_steps=4).train()
    interrupted, _ = load(tiny_checkpoints)
    trainer = make(interrupted, processor, gran[1], tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    trainer.add_callback(StopAt(2))
    trainer.train()
    resumed, _ = load(tiny_checkpoints)
    make(resumed, processor, gran[1], tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


# ============================================================================================ GRPO rewards
@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_rewards_equal_box_iou(tiny_checkpoints, box_format):
    _, processor = load(tiny_checkpoints, box_format)
    size, truth = (64, 48), [10.0, 8.0, 40.0, 30.0]

    def answer(box):
        return processor.encode_box(box, size)

    shifted, far = [14.0, 10.0, 44.0, 36.0], [50.0, 40.0, 63.0, 47.0]
    completions = [answer(truth), answer(shifted), answer(far), processor.encode_boxes([shifted, truth], size),
                   "no box here", "", "[3, 4" if box_format == "text" else "<box><coord_3>"]
    decoded = [processor.decode_boxes(c, size)[0] for c in completions[:4]]  # bin centres of the first box
    expected = [box_iou(b, truth) for b in decoded] + [0.0, 0.0, 0.0]
    n = len(completions)
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    for form in (completions, conversational):
        rewards = BoxIoUReward(processor)(prompts=[None] * n, completions=form, box=[truth] * n, image_size=[list(size)] * n)
        assert rewards == expected
    assert 0.9 < rewards[0] < 1.0 and 0 < rewards[1] < rewards[0] and rewards[2] == 0.0
    assert BoxFormatReward(processor)(prompts=[None] * n, completions=completions, image_size=[size] * n) == [1.0] * 4 + [0.0] * 3
    assert [f.__name__ for f in grounding_rewards(processor, box_grammar=False)] == ["iou", "box_format"]


# ============================================================================================ GRPO training
class Recorder:
    """An extra reward of 0 that keeps what trl passes to reward functions."""

    __name__ = "recorder"

    def __init__(self):
        self.completions, self.boxes = [], []

    def __call__(self, prompts, completions, box, image_size, **kwargs):
        self.completions += [c[0]["content"] for c in completions]
        self.boxes += list(box)
        return [0.0] * len(completions)


@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_grpo_trains_llm_keeps_vit_every_sample_a_box(tiny_checkpoints, gran, tmp_path, box_format):
    model, processor = load(tiny_checkpoints, box_format)
    with torch.no_grad():  # an in-memory change the checkpoint on disk does not have: the KL reference must hold it
        model.lm_head.weight.mul_(1.5)
    start = snapshot(model)
    recorder = Recorder()
    trainer = grpo_trainer(model, processor, gran[1], tmp_path, reward_funcs=[BoxIoUReward(processor), recorder])
    assert trainer.parameter_table["vision_tower"][0] == 0
    trainer.train()
    assert_vit_frozen_rest_trained(model, start, ("multi_modal_projector", "language_model", "lm_head"))
    # (a) the reference is the phase's starting model as it was in memory, and stays frozen
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, start[name]) and not param.requires_grad, name
    # (b) under the box grammar every sampled answer holds a box (an untrained model rarely writes one on its own)
    assert len(recorder.completions) == 2 * 4
    assert all(processor.decode_boxes(c, (64, 64)) for c in recorder.completions), recorder.completions
    logged = trainer.state.log_history[0]
    assert {"rewards/iou/mean", "kl", "reward"} <= set(logged)
    assert "generate" not in model.__dict__  # the grammar is in generate only during the rollouts


def test_trl_reference_and_prompt_ids_without_the_adapters(tiny_checkpoints, gran, tmp_path):
    """(a) trl alone loads the KL reference from `_name_or_path` on disk, not the in-memory weights; (c) the processor
    pads the rows of trl's `apply_chat_template` call unless `chat_template_kwargs` asks it not to. The GranViT trainer
    fixes both."""
    from trl import GRPOTrainer

    model, processor = load(tiny_checkpoints)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    args = GranViTGRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                             beta=0.04, max_completion_length=8, **COMMON)
    prompts = grounding_prompts(gran[1], TaskBuilder(processor, tasks={"caption2bbox": 1.0}, regions_per_image=1,
                                                    multi_box=False))
    plain = GRPOTrainer(model=model, args=args, train_dataset=prompts, processing_class=processor,
                        reward_funcs=BoxIoUReward(processor))
    assert not torch.equal(plain.ref_model.lm_head.weight, model.lm_head.weight)

    ours = grpo_trainer(GranViTForConditionalGeneration.from_pretrained(tiny_checkpoints("text")), processor, gran[1],
                        tmp_path, beta=0.04, chat_template_kwargs={"processor_kwargs": {"padding_side": "left"}})
    assert ours.chat_template_kwargs["processor_kwargs"] == {"padding_side": "left", "padding": False,
                                                             "return_tensors": None}  # the user's kwargs kept
    messages = [prompts[i]["prompt"] for i in range(3)]
    for m, i in zip(messages, range(3)):
        m[0]["content"] = [{"type": "image", "image": prompts[i]["image"]}, {"type": "text", "text": m[0]["content"]}]
    expected = processor.prompt_ids([m[0]["content"][1]["text"] for m in messages])
    assert len({len(e) for e in expected}) > 1  # captions of different lengths

    def trl_call(**chat_template_kwargs):  # the call trl makes to tokenize its prompts
        return processor.apply_chat_template(conversation=messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, **chat_template_kwargs)["input_ids"]

    assert [list(map(int, row)) for row in trl_call()] != expected  # padded rows: pads taken as prompt tokens
    assert trl_call(**ours.chat_template_kwargs) == expected


class GenerateSpy:
    """Keeps the (input_ids, attention_mask) of every `generate` call of a model (trl's rollouts)."""

    def __init__(self, model):
        self.calls, self.generate = [], model.generate

    def __call__(self, *args, **kwargs):
        self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return self.generate(*args, **kwargs)


def test_grpo_rollouts_see_each_prompt_once_left_padded(tiny_checkpoints, gran, tmp_path, monkeypatch):
    """(c) end to end: in trl's rollouts every attended prompt token is a real one (a row starts at its role token)."""
    model, processor = load(tiny_checkpoints, "text")
    trainer = grpo_trainer(model, processor, gran[1], tmp_path, max_steps=1)
    spy = GenerateSpy(model)
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **k: spy(*a, **k))
    trainer.train()
    user = processor.tokenizer.convert_tokens_to_ids("<|user|>")
    assert spy.calls
    for input_ids, attention_mask in spy.calls:
        first = attention_mask.argmax(dim=1)  # (batch,) the first attended position of each row
        assert (input_ids.gather(1, first[:, None]) == user).all()
        assert all(attention_mask[row, first[row]:].all() for row in range(len(first)))  # left padding only


@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_grpo_samples_only_under_the_grammar_it_is_given(tiny_checkpoints, box_format):
    """box_grammar: false samples freely, so generate's own grammar for grounding requests stays off inside trl."""
    model, processor = load(tiny_checkpoints, box_format)
    batch = processor(images=[Image.new("RGB", (64, 48), "red")], text=[processor.caption2bbox_prompt("red")])
    kwargs = dict(max_new_tokens=processor.max_box_tokens + 2, do_sample=False)
    plain = model.generate(**batch, constrain_boxes=False, **kwargs)
    assert not torch.equal(model.generate(**batch, **kwargs), plain)  # generate alone grounds under the grammar
    with logits_processor_in_generate(model, None):
        assert torch.equal(model.generate(**batch, **kwargs), plain)
    grammar = model.box_constraint(processor, force_box=True)
    with logits_processor_in_generate(model, grammar):
        constrained = model.generate(**batch, **kwargs)
    assert torch.equal(constrained, model.generate(**batch, logits_processor=LogitsProcessorList([grammar]), **kwargs))


def test_grpo_with_lora_uses_the_adapter_free_model_as_reference(tiny_checkpoints, gran, tmp_path):
    model, processor = load(tiny_checkpoints)
    before = snapshot(model)
    trainer = grpo_trainer(model, processor, gran[1], tmp_path, lora_r=4, max_steps=1, beta=0.04)
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # trl: adapter off = the start
    trainer.train()
    for name, param in model.named_parameters():
        if component_of(name) == "vision_tower" and "lora" not in name:
            assert torch.equal(param, before[name.replace("base_model.model.", "")]), name


# ============================================================================================ runner and CLI
def test_runner_sft_then_grpo_through_granvit_train(tiny_checkpoint, tmp_path):
    from granvit.train.cli import main, phases_to_run
    from granvit.train.recipe import load_recipe
    from granvit.train.runner import run

    overrides = [f"output_dir={tmp_path}", f"model.checkpoint={tiny_checkpoint}", "data.sizes.train=8",
                 "training.max_steps=2", "training.logging_steps=1", "training.save_strategy=\"no\"",
                 "training.disable_tqdm=true"]
    recipe = load_recipe(CONFIG, overrides)
    model, _, state, _ = run(recipe, only=phases_to_run(recipe, "sft", None))
    assert state.curve["loss"] and state.timings["sft_steps"] == 2
    assert "forward" not in model.__dict__  # trl's fused LM head does not travel on with the model
    sft = GranViTForConditionalGeneration.from_pretrained(tmp_path / "sft" / "final")
    assert {"vqa", "caption2bbox", "bbox2caption"} <= set(sft.config.trained_tasks)

    main(["--stage", "grpo", "--config", CONFIG, *overrides])  # starts from sft/final
    grpo = GranViTForConditionalGeneration.from_pretrained(tmp_path / "grpo" / "final")
    for (name, p), q in zip(sft.model.vision_tower.named_parameters(), grpo.model.vision_tower.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(sft.model.language_model.parameters(),
                                                     grpo.model.language_model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_processes(tiny_checkpoint, tmp_path, stage):
    """`torchrun --nproc_per_node 2` on CPU (gloo DDP): both ranks train, rank 0 saves, the ViT is unchanged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "granvit.train.cli", "--stage", stage, "--config", CONFIG, f"output_dir={tmp_path}",
               f"model.checkpoint={tiny_checkpoint}", "data.sizes.train=8", "training.max_steps=2",
               "training.save_strategy=\"no\"", "training.disable_tqdm=true", "training.per_device_train_batch_size=2",
               "phases.grpo.training.per_device_train_batch_size=2", "phases.grpo.training.num_generations=4"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    start = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint)
    trained = GranViTForConditionalGeneration.from_pretrained(tmp_path / stage / "final")
    for (name, p), q in zip(start.model.vision_tower.named_parameters(), trained.model.vision_tower.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(start.lm_head.parameters(), trained.lm_head.parameters()))


@pytest.mark.slow
def test_experiment_scripts_smoke(tiny_checkpoint, tmp_path):
    """experiments/grpo.py (RL vs stage 2 at equal wall time) and experiments/sft_phase.py on a tiny start."""
    import json

    from granvit.experiments import grpo, sft_phase

    start = tmp_path / "start"
    start.mkdir()
    (start / "checkpoint").symlink_to(tiny_checkpoint)
    write_synth(str(start / "data"), {"train": 12, "test": 6}, SynthConfig(image_size=64, max_objects=2, ocr_fraction=0.0,
                                                                        allow_duplicates=False), seed=0)
    grpo.main(["--start", str(start), "--smoke", "--seeds", "0", "--out", str(tmp_path / "grpo")])
    runs = {arm: json.loads((tmp_path / "grpo" / "runs" / f"{arm}_seed0.json").read_text()) for arm in grpo.ARMS}
    assert runs["grpo"]["steps"] == 2 and runs["stage2"]["train_s"] >= runs["grpo"]["train_s"]
    assert all("reward" in e and "kl" in e for e in runs["grpo"]["curve"])
    assert (tmp_path / "grpo" / "grpo.png").read_bytes()[:4] == b"\x89PNG"
    assert "paired (grpo − stage2)" in (tmp_path / "grpo" / "summary.md").read_text()
    result = sft_phase.main(["--start", str(start), "--steps", "2", "--eval-limit", "4", "--out", str(tmp_path / "sft")])
    assert result["steps"] == 2 and 0 <= result["after"]["count_exact"] <= 1


def test_without_fused_lm_head_gives_the_model_its_own_forward_back(tiny_checkpoints):
    """trl patches a fused LM head onto a model it trains as an instance `forward`; the runner takes it off the trained
    model with `without_fused_lm_head` before the next phase or a save."""
    from trl.trainer import add_fused_lm_head

    from granvit.train.trl_stages import without_fused_lm_head

    model, processor = load(tiny_checkpoints)
    batch = processor(images=[Image.new("RGB", (64, 48), "red")], text=[processor.vqa_prompt("what is it")])
    with torch.no_grad():
        expected = model(**batch).logits
    add_fused_lm_head(model)
    assert "forward" in model.__dict__
    assert without_fused_lm_head(model) is model and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
