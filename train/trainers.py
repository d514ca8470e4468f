"""GranViT's training stages as ``transformers.Trainer`` subclasses (what each trains, and which class trains it: the
stage table, stages.py).

    stage 1 (Stage1Trainer): ViT + projector trained through the *frozen* LLM on Bbox2Caption, plus self-distillation
        from an EMA teacher (see ema.py).
    stage 2 (Stage2Trainer): ViT frozen, projector + LLM trained (full or LoRA) on Caption2Bbox (+ some Bbox2Caption).
    projector (ProjectorTrainer): LLaVA's alignment step, only the projector; joint (JointTrainer): every part (not the
        paper's method; the experiments compare against it).
    sft and grpo: trl's SFTTrainer / GRPOTrainer with GranViTTrainer as a base (trl_stages.py).

Every stage sets its ``requires_grad`` masks itself, keeps frozen components in eval mode (no dropout) even while
training, logs a table of trainable / frozen parameters per component and refuses to run if a component that must be
frozen is not. The optimizer has one learning rate per component (``*_lr_scale`` x ``learning_rate``): a freshly
initialised projector learns faster than the pretrained parts around it. Batches come from ``data.tasks.TaskCollator``;
set ``remove_unused_columns=False`` (the default of ``GranViTTrainingArguments``) or the Trainer drops the stage-1
region boxes and crops before the collator sees them.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .build import ship_pipeline
from .data.tasks import TASKS
from .ema import EMATeacherCallback, load_teacher, make_teacher, student_tower
from .freezing import ROWS, apply_stage, component_modules, component_of, format_table, new_token_ids, parameter_table
from .losses import pcgrad, soft_coordinate_loss
from .stages import COMPONENTS, STAGES

logger = logging.getLogger(__name__)
GRADIENT_BALANCE = ("none", "pcgrad")


@dataclass(kw_only=True)
class GranViTTrainingArguments(TrainingArguments):
    """``TrainingArguments`` + the GranViT stage knobs (all read from the YAML config by ``granvit-train``)."""

    remove_unused_columns: bool = False
    distill_lambda: float = 1.0  # weight of the stage-1 distillation MSE (0 = caption loss only)
    ema_decay: float = 0.9  # teacher = a * teacher + (1 - a) * student after every optimizer step
    crop_size: int | None = None  # side of the teacher's crop input; None = the model's image size
    roi_output_size: int = 7  # ROIAlign output side on both the student and the teacher side
    distill_regions_per_example: int = 0  # regions distilled per example (first K of its boxes); 0 = all
    # "layer_norm": MSE between features layer-normed over channels (no affine), as data2vec normalizes its EMA
    # targets; "none": MSE on raw hidden states, which let student and EMA teacher drift apart in scale and collapsed
    # stage 1 on the tiny recipe (EXPERIMENTS.md).
    distill_feature_norm: str = "layer_norm"
    # Per-component learning rates: learning_rate x these (the LLM's scale also covers lm_head).
    vision_lr_scale: float = 1.0
    projector_lr_scale: float = 1.0
    llm_lr_scale: float = 1.0
    # Std (in bins) of Gaussian soft targets for coordinate tokens (box_format="tokens"); 0 = one-hot.
    soft_coord_sigma: float = 0.0
    # Stage 1 with box_format="tokens": train the embedding and lm_head rows of <box>, </box>, <coord_*> while the
    # rest of the LLM stays frozen (a frozen LLM has never seen these new tokens).
    train_new_token_rows: bool = False
    lora_r: int = 0  # stage 2 / sft: 0 = full fine-tuning, > 0 = LoRA of this rank on the language model only
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # A phase with two or more tasks: "pcgrad" steps on the sum of the tasks' gradients after gradient surgery (each
    # task's gradient loses its component along another task's when the two conflict; Yu et al. 2020, "Gradient Surgery
    # for Multi-Task Learning", Algorithm 1); "none" steps on the pooled loss's gradient.
    gradient_balance: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_balance not in GRADIENT_BALANCE:
            raise ValueError(f"gradient_balance must be one of {GRADIENT_BALANCE}, not {self.gradient_balance!r}")


class ShipPipelineCallback(TrainerCallback):
    """Every checkpoint the Trainer writes ships pipeline_granvit.py, which its config's ``custom_pipelines`` names
    (``build.ship_pipeline``: ``model.save_pretrained`` alone does not copy it)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ship_pipeline(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class GranViTTrainer(Trainer):
    """Base of the stages: freezing, eval mode for frozen parts, the parameter table and the frozen-part check."""

    stage: str = ""

    def __init__(self, model=None, args: GranViTTrainingArguments | None = None, **kwargs):
        if not self.stage:
            raise TypeError("use a stage's trainer (stages.STAGES: Stage1Trainer, Stage2Trainer, ...), not GranViTTrainer")
        if not isinstance(args, GranViTTrainingArguments):
            raise TypeError(f"{type(self).__name__} needs GranViTTrainingArguments, got {type(args).__name__}")
        rows = new_token_ids(model.config) if args.train_new_token_rows else None
        model = apply_stage(model, self.stage, args.lora_r, args.lora_alpha, args.lora_dropout, trainable_rows=rows)
        if args.soft_coord_sigma > 0 and "compute_loss_func" not in kwargs:
            config = model.config
            if config.box_format != "tokens":
                raise ValueError("soft_coord_sigma needs box_format='tokens' (text coordinates are several digit tokens)")
            kwargs["compute_loss_func"] = soft_coordinate_loss(config.coord_token_start_id, config.num_coord_bins,
                                                               args.soft_coord_sigma)
        super().__init__(model=model, args=args, **kwargs)
        self._balance_sums = torch.zeros(3, device=self.args.device)  # gradient surgery: (cosine, conflicts, steps)
        self.add_callback(ShipPipelineCallback())
        self.teacher = self.make_teacher()
        self.parameter_table = parameter_table(self.model, self.teacher)
        logger.info("Stage %s parameters:\n%s", self.stage, format_table(self.parameter_table))
        self.check_frozen()

    def train(self, *args, **kwargs):
        """``Trainer.train``, in eager attention while it trains in bf16 autocast on the CPU, where PyTorch's fused SDPA
        backward is slower (BENCHMARKS.md, "Both cores"); the model's own attention comes back afterwards, so what is
        saved and evaluated after training keeps it."""
        if not (self.args.bf16 and self.args.device.type == "cpu"):
            return super().train(*args, **kwargs)
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            return super().train(*args, **kwargs)
        finally:
            self.model.set_attn_implementation(before)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradient_balance == "none":
            return super().training_step(model, inputs, num_items_in_batch)
        return self.balanced_step(model, inputs)

    def balanced_step(self, model, inputs) -> torch.Tensor:
        """One micro-step with gradient surgery (``gradient_balance: pcgrad``): one forward, each task's loss (a mean
        over its labelled tokens), each task's gradient, PCGrad (losses.pcgrad), the result added to ``.grad``.

        With N processes, each task's gradient is summed over the processes (and divided by its tokens over all of
        them) before the surgery, so N processes take the step one process would take on the global batch. The
        forward runs on the unwrapped model and the gradients come from ``torch.autograd.grad``, which DDP's gradient
        hooks never see: the all-reduce here is the only one."""
        model.train()
        self.set_frozen_eval(model)
        inputs = self._prepare_inputs(inputs)
        tasks, labels = inputs.pop("tasks"), inputs.pop("labels")
        module = self.accelerator.unwrap_model(model)
        params = [p for p in module.parameters() if p.requires_grad]
        with self.compute_loss_context_manager():
            outputs = module(**inputs)
        config = self.base_model().config
        loss_fn = self.compute_loss_func or soft_coordinate_loss(config.coord_token_start_id, config.num_coord_bins, 0.0)
        sums, tokens = [], []
        for name in TASKS:  # a fixed order: every process reduces the same list, whatever its batch holds
            keep = torch.tensor([t == name for t in tasks], device=labels.device)[:, None]
            task_labels = labels.masked_fill(~keep, -100)
            tokens.append((task_labels[:, 1:] != -100).sum())
            sums.append(loss_fn(outputs, task_labels, num_items_in_batch=1) if tokens[-1] else None)
        grads = []
        for i, total in enumerate(sums):
            if total is None:
                grads.append(torch.zeros(sum(p.numel() for p in params), device=labels.device))
                continue
            last = all(later is None for later in sums[i + 1:])
            parts = torch.autograd.grad(total, params, retain_graph=not last, allow_unused=True)
            grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                    for g, p in zip(parts, params)]))
        grads, tokens = torch.stack(grads), torch.stack(tokens).float()
        loss = torch.stack([t.detach() for t in sums if t is not None]).sum() / tokens.sum().clamp(min=1)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(grads)
            torch.distributed.all_reduce(tokens)
        present = tokens > 0
        step, cosine = pcgrad(list(grads[present] / tokens[present, None]))
        step = step / self.current_gradient_accumulation_steps
        offset = 0
        for p in params:
            g = step[offset: offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
            offset += p.numel()
        self._balance_sums += torch.stack([cosine.detach().to(self._balance_sums), (cosine < 0).to(self._balance_sums),
                                           self._balance_sums.new_ones(())])
        return loss / self.current_gradient_accumulation_steps

    def log(self, logs: dict, start_time=None) -> None:
        """The Trainer's log, + with gradient surgery the mean cosine of the first two tasks' gradients since the last
        log and the share of steps where they conflicted (cosine < 0)."""
        if self._balance_sums[2] > 0:
            cosine, conflicts, steps = self._balance_sums.tolist()
            logs["task_grad_cosine"], logs["task_grad_conflicts"] = cosine / steps, conflicts / steps
            self._balance_sums.zero_()
        super().log(logs, start_time)

    def make_teacher(self) -> nn.Module | None:
        return None

    def base_model(self, model: nn.Module | None = None) -> nn.Module:
        """The GranViTForConditionalGeneration under DDP / PEFT wrappers."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def frozen_components(self) -> list[str]:
        return [c for c in COMPONENTS if c not in STAGES[self.stage].trains]

    def check_frozen(self) -> None:
        """Refuse to train when a must-be-frozen component (or the teacher) has a trainable parameter."""
        offenders = {c: self.parameter_table[c][0] for c in self.frozen_components() + ["teacher"] if self.parameter_table.get(c, (0, 0))[0]}
        if offenders:
            raise RuntimeError(
                f"Stage {self.stage} must keep {self.frozen_components()} and the teacher frozen, but these have "
                f"trainable parameters: {offenders}. Something re-enabled requires_grad after apply_stage "
                f"(a LoRA target matching the vision tower? a manual requires_grad_(True)?)"
            )

    def set_frozen_eval(self, model: nn.Module) -> None:
        """``Trainer.training_step`` calls ``model.train()`` each step; put the frozen components back in eval mode."""
        modules = component_modules(self.base_model(model))
        for name in self.frozen_components():
            modules[name].eval()

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings, with one parameter group per (component learning rate, decay).

        ``Trainer.create_optimizer`` is the documented hook for parameter groups; every group's ``lr`` is
        ``learning_rate`` x its component's scale, and the scheduler scales every group alike. Rows trained inside a
        frozen matrix (``train_new_token_rows``) are never decayed: decay would move the frozen rows too.
        """
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        a = self.args
        scales = {"vision_tower": a.vision_lr_scale, "multi_modal_projector": a.projector_lr_scale,
                  "language_model": a.llm_lr_scale, "lm_head": a.llm_lr_scale}
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                weight_decay = a.weight_decay if name in decay and not hasattr(param, ROWS) else 0.0
                groups.setdefault((scales[component_of(name)], weight_decay), []).append(param)
        param_groups = [{"params": params, "lr": a.learning_rate * scale, "weight_decay": wd}
                        for (scale, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(a, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.set_frozen_eval(model)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class Stage1Trainer(GranViTTrainer):
    """Bbox2Caption through the frozen LLM + lambda * MSE(teacher(crop), ROIAlign(student(image), box))."""

    stage = "1"
    # `compute_loss` returns the loss already scaled for gradient accumulation (the Trainer's public switch): the
    # caption term comes normalized over the GA window or as a batch mean, the distillation term is a batch mean.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: GranViTTrainingArguments | None = None, **kwargs):
        if args.gradient_balance != "none":
            raise ValueError("stage 1 has one task and the distillation term: gradient_balance is for a phase with two "
                             "or more tasks (stage 2, joint)")
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise NotImplementedError(
                "Stage 1 under DeepSpeed ZeRO-3 is not supported: the EMA update needs the full (unpartitioned) "
                "student tower. Use ZeRO-2, DDP or FSDP for stage 1 (the ViT is small), ZeRO-3 for stage 2."
            )
        self.add_callback(EMATeacherCallback(self.teacher, args.ema_decay))
        self._log_sums = torch.zeros(2, device=self.args.device)  # (caption, distill) contributions since the last log
        self._last_log_step = 0

    def make_teacher(self) -> nn.Module:
        return make_teacher(student_tower(self.model)).to(self.args.device)

    # ---- loss ---------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        boxes, crops, extents = inputs.pop("region_boxes"), inputs.pop("crop_pixel_values"), inputs.pop("crop_extents")
        lm_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.args.distill_lambda == 0:
            distill = lm_loss.new_zeros(())
        else:
            distill = self.distill_loss(outputs.image_outputs.last_hidden_state, boxes, crops, extents,
                                        inputs.get("image_grids"))
        loss = lm_loss + self.args.distill_lambda * distill
        if model.training:
            ga = self.current_gradient_accumulation_steps
            # `Trainer.compute_loss` hands `num_items_in_batch` (the labelled tokens of the whole GA window) to the
            # model's loss (GranViT's forward takes loss kwargs) or to `compute_loss_func`: the caption loss is then a
            # sum over tokens / tokens in the window, else a batch mean like the distillation term.
            per_window = num_items_in_batch is not None and (
                self.model_accepts_loss_kwargs or self.compute_loss_func is not None
            )
            caption = lm_loss if per_window else lm_loss / ga
            loss = caption + self.args.distill_lambda * distill / ga
            self._log_sums += torch.stack([caption.detach(), distill.detach() / ga])
        return (loss, outputs) if return_outputs else loss

    def distill_loss(self, patch_features: torch.Tensor, boxes: list[torch.Tensor], crops: torch.Tensor,
                     extents: torch.Tensor | None = None, image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between ROIAlign of the student's full-image patches at each box and the teacher's features of its crop.

        patch_features: (views, g*g, d) from the forward (the image is encoded once; with tiling, ``image_grids``
        stitches each image's tiles back into one map); boxes: b tensors (K_i, 4) in that map's frame
        (``to_model_space``); crops: (sum K_i, 3, S, S) crop pixel values, each crop padded to a square at the
        top-left; extents: (sum K_i, 2) the crop content's (w, h) in that square, in (0, 1] (the collator's
        ``crop_extents``; None derives them from the boxes, which only holds without tiling, where the model frame
        scales both axes alike).
        """
        if extents is None:
            if image_grids is not None:
                raise ValueError("distill_loss with image_grids needs the collator's crop_extents: tiled model-frame "
                                 "boxes are normalized per axis and no longer give the crop's aspect ratio")
            wh = torch.cat(boxes)[:, 2:] - torch.cat(boxes)[:, :2]
            extents = wh / wh.max(dim=1, keepdim=True).values  # (sum K_i, 2)
        base, out = self.base_model(), self.args.roi_output_size
        keep = self.args.distill_regions_per_example
        starts = torch.tensor([0] + [len(b) for b in boxes]).cumsum(0).tolist()
        picked = [list(range(s, s + (min(len(b), keep) if keep else len(b)))) for s, b in zip(starts, boxes)]
        boxes = [b[: len(idx)] for b, idx in zip(boxes, picked)]
        crops = crops[[i for idx in picked for i in idx]]  # (n, 3, S, S)
        extents = extents[[i for idx in picked for i in idx]]  # (n, 2)

        grid = round(patch_features.shape[1] ** 0.5)
        student_patches = patch_features.reshape(patch_features.shape[0], grid, grid, -1)  # (b, g, g, d)
        student = base.get_region_features(boxes=boxes, output_size=out, patch_features=student_patches,
                                           image_grids=image_grids)  # (n, d, out, out)

        with torch.no_grad():
            tower = self.teacher
            if self.args.crop_size and self.args.crop_size != crops.shape[-1]:
                crops = F.interpolate(crops, size=(self.args.crop_size,) * 2, mode="bilinear", antialias=True)
                tower = _InterpolatedPositions(self.teacher)
            teacher_patches = base.model.get_patch_features(crops, vision_tower=tower)  # (n, g', g', d)
            # The crop keeps its aspect ratio inside its padded square: ROIAlign over the content part only, whose
            # extent the collator took from the pixel box (model-frame boxes are anisotropic with tiling).
            extent = extents.to(teacher_patches)  # (n, 2) in (0, 1]
            index = torch.arange(len(extent), device=extent.device, dtype=extent.dtype).unsqueeze(1)
            rois = torch.cat([index, torch.zeros_like(extent), extent], dim=1)  # (n, 5): [crop index, x1, y1, x2, y2]
            teacher = base.get_region_features(boxes=rois, output_size=out, patch_features=teacher_patches)
        student, teacher = student.float(), teacher.float()  # (n, d, out, out)
        if self.args.distill_feature_norm == "layer_norm":
            channels = student.shape[1:2]
            student = F.layer_norm(student.movedim(1, -1), channels)
            teacher = F.layer_norm(teacher.movedim(1, -1), channels)
        elif self.args.distill_feature_norm != "none":
            raise ValueError(f"distill_feature_norm must be 'layer_norm' or 'none', not {self.args.distill_feature_norm!r}")
        return F.mse_loss(student, teacher)

    # ---- logging and checkpoints -----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        steps = self.state.global_step - self._last_log_step
        if "loss" in logs and steps > 0:
            # mean over ranks of each rank's contribution, as the Trainer does for "loss"
            caption, distill = (self.accelerator.gather(self._log_sums[None]).mean(0) / steps).tolist()
            logs["caption_loss"], logs["distill_loss"] = caption, distill
            self._log_sums.zero_()
            self._last_log_step = self.state.global_step
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``Trainer.train``, with the EMA teacher restored from the checkpoint a run resumes from (on every backend:
        DeepSpeed skips the Trainer's own model loading, not this)."""
        if trial is not None:
            raise NotImplementedError("stage 1 keeps its EMA teacher next to the checkpoints in output_dir; "
                                      "hyperparameter search (trial folders) is not supported")
        checkpoint = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if checkpoint:  # True without a checkpoint: Trainer.train raises
            load_teacher(self.teacher, checkpoint)
            self._last_log_step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)


class _InterpolatedPositions(nn.Module):
    """Runs a SigLIP/CLIP tower with its learned position table interpolated, for crops smaller than the image size."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, **kwargs):
        return self.tower(interpolate_pos_encoding=True, **kwargs)


class Stage2Trainer(GranViTTrainer):
    """Caption2Bbox (mixed with Bbox2Caption on the data side) with the ViT frozen; projector + LLM, full or LoRA."""

    stage = "2"


class ProjectorTrainer(GranViTTrainer):
    """LLaVA's alignment step: only the projector trains, the pretrained ViT and LLM stay frozen."""

    stage = "projector"


class JointTrainer(GranViTTrainer):
    """Every parameter on the region tasks at once (no distillation): the experiments' alternative to the stages."""

    stage = "joint"


def __getattr__(name: str):
    # TRAINERS, the old name of the stages trained here: a view of the stage table (train/runner.py reads it).
    if name == "TRAINERS":
        return {stage: spec.trainer_class() for stage, spec in STAGES.items() if not spec.uses_trl}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
