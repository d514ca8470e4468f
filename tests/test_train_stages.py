"""Stage trainers: what each stage trains and freezes, the EMA teacher, the distillation loss, GA scaling, LoRA."""
import pytest
import torch
from granvit import GranViTForConditionalGeneration
from granvit.train.data.synth import SynthConfig, generate_record
from granvit.train.data.tasks import TaskBuilder, TaskCollator
from granvit.train.ema import ema_update
from granvit.train.trainers import (
    COMPONENTS,
    GranViTTrainingArguments,
    Stage1Trainer,
    Stage2Trainer,
    component_of,
    parameter_table,
)
from transformers import TrainerCallback

SYNTH = SynthConfig(image_size=64, min_objects=1, max_objects=2, ocr_fraction=0.0, allow_duplicates=False)


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


@pytest.fixture()
def model(tiny_checkpoint):
    return GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint)


def examples(processor, stage: str, n_images: int = 4):
    records = [generate_record(SYNTH, 0, "train", i) for i in range(n_images)]
    tasks = ("bbox2caption",) if stage == "1" else ("caption2bbox", "bbox2caption")
    return list(TaskBuilder(processor, tasks=tasks, regions_per_image=1, stage1=stage == "1").iter_examples(records))


def arguments(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path), "use_cpu": True, "max_steps": 3, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "roi_output_size": 2,
        "seed": 0, "disable_tqdm": True,
    }
    return GranViTTrainingArguments(**{**kwargs, **overrides})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class ModeRecorder(TrainerCallback):
    """Records, during training forwards, which components ran in train mode (i.e. with dropout)."""

    def __init__(self, model):
        self.seen = {}
        modules = {"vision_tower": model.model.vision_tower, "language_model": model.model.language_model}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, args, name=name: self.seen.setdefault(name, set()).add(m.training))


@pytest.mark.parametrize("stage, trainer_cls", [("1", Stage1Trainer), ("2", Stage2Trainer)])
def test_frozen_unchanged_trained_changed(processor, model, tmp_path, stage, trainer_cls):
    before = snapshot(model)
    trainer = trainer_cls(model=model, args=arguments(tmp_path), train_dataset=examples(processor, stage),
                          data_collator=TaskCollator(processor), processing_class=processor)
    recorder = ModeRecorder(model)  # after the teacher copy, which would otherwise copy the hooks too
    trainer.train()
    trained = {"1": {"vision_tower", "multi_modal_projector"}, "2": {"multi_modal_projector", "language_model", "lm_head"}}[stage]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert component_of(name) in trained, name
            assert not torch.equal(param, before[name]), f"stage {stage}: trainable {name} did not change"
        else:
            # the only frozen parameters of a trained component: the ViT's unused final norm (hidden states feed GranViT)
            assert component_of(name) not in trained or ".post_layernorm." in name, name
            assert torch.equal(param, before[name]), f"stage {stage}: frozen {name} changed"
    frozen_tower = "language_model" if stage == "1" else "vision_tower"
    trained_tower = "vision_tower" if stage == "1" else "language_model"
    assert recorder.seen[frozen_tower] == {False}  # no dropout in the frozen part, although the Trainer calls train()
    assert recorder.seen[trained_tower] == {True}
    table = trainer.parameter_table
    assert set(table) == set(COMPONENTS) | ({"teacher"} if stage == "1" else set())
    assert all((table[c][0] > 0) == (c in trained) for c in COMPONENTS)


def test_refuses_when_a_frozen_component_trains(processor, model, tmp_path):
    trainer = Stage1Trainer(model=model, args=arguments(tmp_path), train_dataset=examples(processor, "1"),
                            data_collator=TaskCollator(processor), processing_class=processor)
    model.lm_head.weight.requires_grad_(True)
    trainer.parameter_table = parameter_table(trainer.model, trainer.teacher)
    with pytest.raises(RuntimeError, match="lm_head"):
        trainer.check_frozen()


class StudentRecorder(TrainerCallback):
    """Student tower parameters after every optimizer step (runs after the EMA callback, which does not touch them)."""

    def __init__(self):
        self.history = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append([p.detach().clone() for p in model.model.vision_tower.parameters()])


def test_teacher_is_the_ema_of_the_student_and_gets_no_gradient(processor, model, tmp_path):
    decay = 0.7
    initial = [p.detach().clone() for p in model.model.vision_tower.parameters()]
    recorder = StudentRecorder()
    trainer = Stage1Trainer(model=model, args=arguments(tmp_path, ema_decay=decay), train_dataset=examples(processor, "1"),
                            data_collator=TaskCollator(processor), processing_class=processor, callbacks=[recorder])
    trainer.train()
    expected = initial
    for student in recorder.history:
        expected = [decay * t + (1 - decay) * s for t, s in zip(expected, student)]
    got = list(trainer.teacher.parameters())
    assert len(recorder.history) == 3
    for t, e in zip(got, expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)
        assert t.grad is None and not t.requires_grad
    assert not trainer.teacher.training
    assert not any(t is s for t in got for s in model.parameters())  # a copy, not shared storage


def test_teacher_is_in_every_checkpoint_and_comes_back_on_resume(processor, tiny_checkpoint, tmp_path):
    """Through the Trainer's public hooks (`on_save`, `train`): if transformers moves where or when a checkpoint is
    written, the file is missing here, or the restored teacher is the fresh copy of the student instead of the saved one."""
    from safetensors.torch import load_file

    from granvit.train.ema import TEACHER_FILE

    data = examples(processor, "1")
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    first = Stage1Trainer(model=GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint), args=args,
                          train_dataset=data, data_collator=TaskCollator(processor), processing_class=processor)
    first.train()
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "trainer_state.json").is_file() and (folder / TEACHER_FILE).is_file()
    saved = load_file(tmp_path / "checkpoint-2" / TEACHER_FILE)
    assert first.teacher.state_dict().keys() == saved.keys()
    assert all(torch.equal(first.teacher.state_dict()[k], v) for k, v in saved.items())

    resumed = Stage1Trainer(model=GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint), args=args,
                            train_dataset=data, data_collator=TaskCollator(processor), processing_class=processor)
    fresh = {k: v.clone() for k, v in resumed.teacher.state_dict().items()}
    assert not all(torch.equal(fresh[k], v) for k, v in saved.items())  # the comparison below is not trivial
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint is at max_steps: nothing left to train
    assert all(torch.equal(resumed.teacher.state_dict()[k], v) for k, v in saved.items())


def test_ema_update_formula():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t.detach(), e, rtol=0, atol=1e-7)


def test_ema_update_from_an_fsdp2_sharded_student(tmp_path):
    """Under FSDP2 the student's parameters are DTensors; the teacher, copied before sharding, holds full tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        student = torch.nn.Linear(3, 2)
        teacher = torch.nn.Linear(3, 2)
        expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
        fully_shard(student, mesh=init_device_mesh("cpu", (1,)))
        assert all(hasattr(p, "full_tensor") for p in student.parameters())
        ema_update(teacher, student, 0.9)
        for t, e in zip(teacher.parameters(), expected):
            torch.testing.assert_close(t.detach(), e, rtol=0, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_distill_loss_falls_on_a_fixed_batch(processor, model, tmp_path):
    batch = examples(processor, "1")[:4]  # one batch, seen at every step
    args = arguments(tmp_path, max_steps=12, learning_rate=3e-3, num_train_epochs=100)
    trainer = Stage1Trainer(model=model, args=args, train_dataset=batch, data_collator=TaskCollator(processor),
                            processing_class=processor)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "distill_loss" in h]
    assert len(logs) == 12
    first, last = logs[0]["distill_loss"], logs[-1]["distill_loss"]
    assert last < 0.5 * first, (first, last)
    for h in logs:  # the logged total is caption + lambda * distill
        assert h["loss"] == pytest.approx(h["caption_loss"] + h["distill_loss"], rel=1e-4)


def test_gradient_accumulation_matches_one_big_batch(processor, tiny_checkpoint, tmp_path):
    """GA=2 x 2 examples must update exactly like 1 x 4 examples: the per-batch-mean distillation term is divided by
    the GA steps while the caption loss is normalized by the tokens of the whole window (transformers5.md section 6)."""
    data = examples(processor, "1")[:4]
    results = []
    for batch, ga in ((4, 1), (2, 2)):
        model = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint)
        args = arguments(tmp_path / f"ga{ga}", max_steps=1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=ga, optim="sgd", learning_rate=0.1, train_sampling_strategy="sequential")
        trainer = Stage1Trainer(model=model, args=args, train_dataset=data, data_collator=TaskCollator(processor),
                                processing_class=processor)
        trainer.train()
        results.append((snapshot(model), trainer.state.log_history[0]))
    (big, big_log), (acc, acc_log) = results
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)
    for key in ("loss", "caption_loss", "distill_loss"):
        assert acc_log[key] == pytest.approx(big_log[key], rel=1e-4), key


def test_lora_stage2_saves_reloads_and_merges(processor, model, tmp_path, tiny_checkpoint):
    from peft import PeftModel

    trainer = Stage2Trainer(model=model, args=arguments(tmp_path, lora_r=4), train_dataset=examples(processor, "2"),
                            data_collator=TaskCollator(processor), processing_class=processor)
    lora_names = [n for n, _ in trainer.model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert not any("lora" in n for n, _ in trainer.model.base_model.model.model.vision_tower.named_parameters())
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = TaskCollator(processor)(examples(processor, "2")[:2])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits

    base = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        untrained = base(**batch).logits
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, untrained, atol=1e-4)  # the adapters (and projector copy) did change the model


def test_distill_regions_cap_and_small_teacher_crops(processor, model, tmp_path):
    trainer = Stage1Trainer(model=model, args=arguments(tmp_path, distill_regions_per_example=1),
                            train_dataset=examples(processor, "1"), data_collator=TaskCollator(processor),
                            processing_class=processor)
    batch = TaskCollator(processor)(examples(processor, "1")[:2])
    with torch.no_grad():
        patches = model.get_image_features(batch["pixel_values"]).last_hidden_state  # (2, 16, d)
    boxes = [torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.0, 0.2, 0.3, 0.9], [0.5, 0.5, 1.0, 1.0]])] * 2  # 3 regions per example
    crops = batch["crop_pixel_values"][[0, 0, 0, 1, 1, 1]]
    capped = trainer.distill_loss(patches, boxes, crops)
    trainer.args.distill_regions_per_example = 0
    first_only = trainer.distill_loss(patches, [b[:1] for b in boxes], crops[[0, 3]])
    everything = trainer.distill_loss(patches, boxes, crops)
    torch.testing.assert_close(capped, first_only)
    assert not torch.allclose(capped, everything)
    trainer.args.crop_size = 32  # the teacher sees 2 x 2 patches; SigLIP's position table is interpolated
    small = trainer.distill_loss(patches, boxes, crops)
    assert torch.isfinite(small) and not torch.allclose(small, everything)


def test_layer_norm_distillation_ignores_feature_scale(processor, model, tmp_path):
    """With distill_feature_norm='layer_norm' the loss compares feature patterns, not scales; 'none' is raw MSE."""
    trainer = Stage1Trainer(model=model, args=arguments(tmp_path), train_dataset=examples(processor, "1"),
                            data_collator=TaskCollator(processor), processing_class=processor)
    batch = TaskCollator(processor)(examples(processor, "1")[:1])
    with torch.no_grad():
        patches = model.get_image_features(batch["pixel_values"]).last_hidden_state  # (1, 16, d)
    boxes, crops = [torch.tensor([[0.1, 0.1, 0.6, 0.5]])], batch["crop_pixel_values"][:1]
    assert trainer.args.distill_feature_norm == "layer_norm"
    normed = trainer.distill_loss(patches, boxes, crops)
    torch.testing.assert_close(trainer.distill_loss(patches * 10, boxes, crops), normed, rtol=1e-3, atol=1e-4)
    trainer.args.distill_feature_norm = "none"
    raw = trainer.distill_loss(patches, boxes, crops)
    assert not torch.allclose(trainer.distill_loss(patches * 10, boxes, crops), raw)
    trainer.args.distill_feature_norm = "l2"
    with pytest.raises(ValueError, match="distill_feature_norm"):
        trainer.distill_loss(patches, boxes, crops)


def test_new_token_rows_train_while_the_rest_of_the_llm_stays_frozen(processor, model, tmp_path):
    """Stage 1 with train_new_token_rows: the rows of <box>, </box>, <coord_*> learn; every other row is bitwise fixed."""
    from granvit.train.freezing import new_token_ids

    before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    args = arguments(tmp_path, train_new_token_rows=True, weight_decay=0.1)  # decay must not reach the frozen rows
    trainer = Stage1Trainer(model=model, args=args, train_dataset=examples(processor, "1"), data_collator=TaskCollator(processor))
    rows = new_token_ids(model.config)
    assert trainer.parameter_table["new_token_rows"][0] == len(rows) * before.shape[1] * (1 if model.config.tie_word_embeddings else 2)
    trainer.train()
    for weight, old in ((model.get_input_embeddings().weight, before), (model.get_output_embeddings().weight, head_before)):
        moved = (weight.detach() != old).any(dim=1).nonzero().squeeze(1).tolist()
        assert moved and set(moved) <= set(rows)


def test_one_learning_rate_per_component(processor, model, tmp_path):
    args = arguments(tmp_path, learning_rate=1e-3, vision_lr_scale=0.5, projector_lr_scale=2.0, max_steps=1)
    trainer = Stage1Trainer(model=model, args=args, train_dataset=examples(processor, "1"), data_collator=TaskCollator(processor))
    optimizer = trainer.create_optimizer()
    by_lr = {group["lr"]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
    table = trainer.parameter_table
    assert by_lr == {5e-4: table["vision_tower"][0], 2e-3: table["multi_modal_projector"][0]}


def test_one_table_of_stages_and_its_old_views():
    """stages.STAGES is the one definition of a stage; TRAINED, TRAINERS, TRL_STAGES and config_class are views of
    it, and each named class is the stage's own."""
    from granvit.train import freezing, recipe, stages, trainers, trl_stages

    assert freezing.TRAINED == {name: set(stage.trains) for name, stage in stages.STAGES.items()}
    assert trainers.TRAINERS == {name: stage.trainer_class() for name, stage in stages.STAGES.items()
                                 if not stage.uses_trl}
    assert stages.TRL_STAGES == recipe.TRL_STAGES == ("sft", "grpo")
    for name, stage in stages.STAGES.items():
        assert stage.trains <= set(COMPONENTS) and stage.trains, name
        trainer = stage.trainer_class()
        assert issubclass(trainer, trainers.GranViTTrainer) and trainer.stage == name
        assert issubclass(stage.arguments_class(), GranViTTrainingArguments)
    for name in stages.TRL_STAGES:
        assert trl_stages.config_class(name) is stages.STAGES[name].arguments_class()
    assert stages.STAGES["1"].trains == {"vision_tower", "multi_modal_projector"}  # the paper's stage 1: LLM frozen
    assert "vision_tower" not in stages.STAGES["2"].trains  # the paper's stage 2: ViT frozen
    with pytest.raises(ValueError, match="unknown stage '3'"):
        stages.get_stage("3")
    # one trainer per stage: sft runs on trl (trl_stages.GranViTSFTTrainer), trainers.py has no second one
    stage_classes = [c for c in vars(trainers).values() if isinstance(c, type) and issubclass(c, trainers.GranViTTrainer)]
    assert sorted(c.stage for c in stage_classes if c.stage) == sorted(trainers.TRAINERS)


def test_bf16_on_the_cpu_trains_in_eager_attention_and_gives_the_model_back_as_it_was(processor, model, tmp_path):
    seen = []

    class Attention(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((model.config._attn_implementation, model.config.vision_config._attn_implementation))

    before = model.config._attn_implementation
    assert before != "eager"
    for bf16 in (True, False):
        seen.clear()
        Stage2Trainer(model=model, args=arguments(tmp_path, bf16=bf16, max_steps=1), train_dataset=examples(processor, "2"),
                      data_collator=TaskCollator(processor), processing_class=processor, callbacks=[Attention()]).train()
        assert seen == [("eager", "eager")] if bf16 else seen == [(before, before)]
        assert model.config._attn_implementation == before


def test_pcgrad_known_answers():
    from granvit.train.losses import pcgrad

    step, cosine = pcgrad([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])])  # conflicting: both projected
    # g1 - (g1.g2 / |g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1 / |g1|^2) g1 = (0, 1)
    assert torch.allclose(step, torch.tensor([0.5, 1.5])) and abs(cosine.item() + 2 ** -0.5) < 1e-6
    step, cosine = pcgrad([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])  # agreeing: the plain sum
    assert torch.allclose(step, torch.tensor([2.0, 1.0])) and cosine > 0
    step, _ = pcgrad([torch.tensor([3.0, 4.0])])  # one task: its gradient
    assert torch.allclose(step, torch.tensor([3.0, 4.0]))


def test_gradient_surgery_steps_on_the_pcgrad_of_the_tasks_mean_losses(processor, model, tmp_path):
    """The gradient a `gradient_balance: pcgrad` trainer hands its optimizer is PCGrad of the two tasks' gradients,
    each task's loss a mean over its own labelled tokens, computed here by hand from the same batch."""
    from granvit.train.losses import pcgrad, soft_coordinate_loss

    batch_examples = examples(processor, "2")
    collate = TaskCollator(processor, tasks=True)
    batch = collate(batch_examples)
    assert sorted(set(batch["tasks"])) == ["bbox2caption", "caption2bbox"]
    reference = GranViTForConditionalGeneration.from_pretrained(model.name_or_path)
    Stage2Trainer(model=reference, args=arguments(tmp_path / "ref"))  # the same freezing as the trained copy
    params = [p for p in reference.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k not in ("tasks", "labels")}
    reference.train()
    reference.model.vision_tower.eval()
    outputs = reference(**inputs)
    loss_fn = soft_coordinate_loss(reference.config.coord_token_start_id, reference.config.num_coord_bins, 0.0)
    grads = []
    for task in ("bbox2caption", "caption2bbox"):
        keep = torch.tensor([t == task for t in batch["tasks"]])[:, None]
        loss = loss_fn(outputs, batch["labels"].masked_fill(~keep, -100))  # mean over this task's tokens
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]))
    expected, cosine = pcgrad(grads)

    seen = {}

    class Grad(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["grad"] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    trainer = Stage2Trainer(model=model, args=arguments(tmp_path, gradient_balance="pcgrad", max_steps=1, max_grad_norm=0,
                                                        per_device_train_batch_size=len(batch_examples)),
                            train_dataset=batch_examples, data_collator=collate, processing_class=processor,
                            callbacks=[Grad()])
    trainer.train()
    assert torch.allclose(seen["grad"], expected, atol=1e-6, rtol=1e-4)
    assert "task_grad_cosine" in trainer.state.log_history[0]
    assert abs(trainer.state.log_history[0]["task_grad_cosine"] - cosine.item()) < 1e-5


def test_gradient_surgery_is_refused_where_there_is_one_task(processor, model, tmp_path):
    with pytest.raises(ValueError, match="gradient_balance"):
        Stage1Trainer(model=model, args=arguments(tmp_path, gradient_balance="pcgrad"))
    with pytest.raises(ValueError, match="gradient_balance must be one of"):
        arguments(tmp_path, gradient_balance="gradnorm")
