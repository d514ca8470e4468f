"""The trl stages: `sft` on trl's `SFTTrainer`, and `grpo`, grounding refined by RL with an IoU reward on `GRPOTrainer`.

    granvit-train --stage sft --config train/configs/trl_tiny_cpu.yaml       # one CPU (after --stage 1 and 2)
    granvit-train --stage grpo --config train/configs/trl_tiny_cpu.yaml
    granvit-train --stage grpo --config train/configs/grpo_quickstart.yaml   # RL on the main job's checkpoint
    granvit-train --stage grpo --config train/configs/grpo_quickstart.yaml training.use_cpu=false threads=0  # one GPU
    accelerate launch --config_file train/configs/accelerate/ddp.yaml -m granvit.train.cli \\
        --stage grpo --config train/configs/grpo_quickstart.yaml training.use_cpu=false          # many GPUs
    # many processes on one CPU: torchrun --standalone --nproc_per_node 2 -m granvit.train.cli --stage grpo ...

SFT trains on conversations (data/conversations.py: the VQA / OCR / region queries of Gran rows, or any dataset of
trl conversations); GRPO samples `num_generations` answers per Caption2Bbox prompt and rewards each with its box's IoU
with the true box (rewards.py). Both are GranViT stages (trainers.GranViTTrainer is a base of each): freezing.TRAINED's
masks (ViT frozen), LoRA on the language model only (`lora_r`), the parameter table, the frozen-part check,
per-component learning rates and resume.

Where trl's behaviour does not fit GranViT there is one small adapter each, pinned by tests/test_trl_stages.py:
  sft   trl's `assistant_only_loss` needs `{% generation %}` markers in the chat template and character offsets from
        the processor; GranViTProcessor tokenizes itself (untrusted-text markers, `<image>` expansion) and returns no
        offsets, so trl raises. `ConversationCollator` keeps trl's collator and labels the assistant turns from the role
        tokens instead: everything after `<|assistant|>` up to and including the eos that closes the turn.
  grpo  (a) trl loads the KL reference from `model.config._name_or_path`, i.e. from disk, not the in-memory weights the
        runner passes from phase to phase: the reference here is a frozen copy of the model the phase starts from
        (with LoRA: the model with the adapter switched off, as in trl).
        (b) trl's `generate` call takes no LogitsProcessor: the box grammar (region_decoding_granvit.py) is added to it.
        Sampling then draws from the policy renormalized over the tokens the grammar allows, while the loss scores the
        samples under the policy itself, as trl does with vLLM's structured outputs; every sample holds a box. With
        `box_grammar: false` the samples are free: `generate`'s own grammar for grounding requests is turned off too.
        (c) GranViTProcessor pads a batch by default; trl takes the prompt rows its `apply_chat_template` call returns
        as they are: `chat_template_kwargs` asks the processor for unpadded lists (`unpadded_prompts`).
        vLLM has no GranViT model implementation, so `use_vllm` is refused.
Each adapter uses trl's public interface only (arguments, `training_step` / `prediction_step`, `add_fused_lm_head`),
no private trl method: nothing here breaks when trl reorganises its internals between releases. trl patches its
fused LM head onto a model it trains as an instance `forward`: `without_fused_lm_head` takes it off the trained model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer import add_fused_lm_head
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from ..console import UserError
from ..processing_granvit import ASSISTANT_TOKEN
from ..box_grammar_granvit import BoxConstraintLogitsProcessor
from .data.conversations import grounding_prompts, sft_items
from .data.tasks import SkipCounter, TaskBuilder
from .rewards import grounding_rewards
from .stages import STAGES
from .trainers import GranViTTrainer, GranViTTrainingArguments


# ============================================================================================ arguments
@dataclass(kw_only=True)
class GranViTSFTConfig(SFTConfig, GranViTTrainingArguments):
    """trl's SFTConfig + the GranViT stage knobs, with the other stages' defaults: fp32 (trl: bf16), no activation
    checkpointing (trl: on), no truncation (GranViTProcessor does not truncate: a cut could drop image tokens)."""

    bf16: bool | None = False
    gradient_checkpointing: bool | None = None  # the deprecated alias of activation_checkpointing (default off)
    max_length: int | None = None
    remove_unused_columns: bool = False


@dataclass(kw_only=True)
class GranViTGRPOConfig(GRPOConfig, GranViTTrainingArguments):
    """trl's GRPOConfig + the GranViT stage knobs. `per_device_train_batch_size` counts completions: each step samples
    `num_generations` of them for each of (batch x processes x steps_per_generation / num_generations) prompts."""

    bf16: bool | None = False
    gradient_checkpointing: bool | None = None
    remove_unused_columns: bool = False
    beta: float = 0.04  # KL to the starting model (trl's default 0 would train without it)
    disable_dropout: bool = True  # the sampled and the scored log-probabilities come from the same network
    max_completion_length: int | None = None  # None: one box and its eos (processor.max_box_tokens + 1)
    box_grammar: bool = True  # sample under the box grammar (every answer a box); False adds a format reward


def config_class(stage: str) -> type:
    """The arguments class of a trl stage: the old name, a view of the stage table (train/recipe.py reads it)."""
    return STAGES[stage].arguments_class()


# ============================================================================================ SFT
def assistant_only(input_ids: torch.Tensor, labels: torch.Tensor, assistant_id: int, end_id: int) -> torch.Tensor:
    """`labels` with -100 outside the assistant turns: a token is kept when the last role marker before it
    (`<|assistant|>` or the turn-closing eos) is `<|assistant|>`, so the closing eos is kept and pads are not."""
    marker = (input_ids == assistant_id) | (input_ids == end_id)  # (batch, seq)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last = torch.where(marker, positions, -1).cummax(dim=1).values  # last marker at or before each position
    before = torch.nn.functional.pad(last[:, :-1], (1, 0), value=-1)  # ... strictly before it
    keep = (before >= 0) & (input_ids.gather(1, before.clamp(min=0)) == assistant_id)
    return labels.masked_fill(~keep, -100)


@dataclass
class ConversationCollator(DataCollatorForVisionLanguageModeling):
    """trl's vision collator on (images, messages) examples, with the loss on assistant turns only (see the module
    docstring). Items may hold several conversations of one image ("conversations", data/conversations.py); their
    skip counts go into `counter`, which the runner logs."""

    counter: SkipCounter = field(default_factory=SkipCounter)

    def torch_call(self, items: list[dict]) -> dict:
        if self.max_length is not None:
            raise ValueError("GranViTProcessor does not truncate: set max_length to None")
        self.counter.absorb(items)
        examples = []
        for item in items:
            images = item["images"] if "images" in item else [item["image"]]
            for messages in item.get("conversations") or [item["messages"]]:
                examples.append({"images": images, "messages": messages})
        batch = super().torch_call(examples)
        tokenizer = self.processor.tokenizer
        assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN)
        batch["labels"] = assistant_only(batch["input_ids"], batch["labels"], assistant_id, tokenizer.eos_token_id)
        return batch


class GranViTSFTTrainer(GranViTTrainer, SFTTrainer):
    """trl's SFTTrainer as the GranViT `sft` stage: ViT frozen, projector + LLM (full or LoRA) on conversations."""

    stage = "sft"


# ============================================================================================ GRPO
class GranViTGRPOTrainer(GranViTTrainer, GRPOTrainer):
    """trl's GRPOTrainer as the GranViT `grpo` stage: Caption2Bbox prompts, IoU rewards, ViT frozen (adapters (a)-(c)
    of the module docstring)."""

    stage = "grpo"

    def __init__(self, model=None, args: GranViTGRPOConfig | None = None, processing_class=None, reward_funcs=None,
                 skip_counter: SkipCounter | None = None, **kwargs):
        if not isinstance(args, GranViTGRPOConfig):
            raise TypeError(f"GranViTGRPOTrainer needs GranViTGRPOConfig, got {type(args).__name__}")
        if args.use_vllm:
            raise ValueError("vLLM has no GranViT model implementation: set use_vllm to false")
        if args.sync_ref_model:
            raise ValueError("sync_ref_model is not supported: the KL reference is the frozen starting model")
        if args.soft_coord_sigma:
            raise ValueError("soft_coord_sigma shapes a cross-entropy, which the grpo stage does not have: set it to 0")
        args.max_completion_length = args.max_completion_length or processing_class.max_box_tokens + 1
        if reward_funcs is None:
            reward_funcs = grounding_rewards(processing_class, args.box_grammar)
        args.chat_template_kwargs = unpadded_prompts(args.chat_template_kwargs)  # (c)
        # (a) trl would load the reference from disk when beta != 0; build it with beta 0, then set the copy.
        beta, reference = args.beta, None
        if beta and not args.lora_r:
            # a copied fused-LM-head patch (trl's) would run the original model's forward
            reference = without_fused_lm_head(copy.deepcopy(model).requires_grad_(False).eval())
        args.beta = 0.0
        try:
            super().__init__(model=model, args=args, processing_class=processing_class, reward_funcs=reward_funcs,
                             **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        if reference is not None:
            add_fused_lm_head(reference, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            if self.is_deepspeed_enabled:
                reference = prepare_deepspeed(reference, self.accelerator)
            elif self.is_fsdp_enabled:
                reference = prepare_fsdp(reference, self.accelerator)
            else:
                reference = self.accelerator.prepare_model(reference, evaluation_mode=True)
            self.ref_model = reference
        self.grammar = None
        if args.box_grammar:
            self.grammar = BoxConstraintLogitsProcessor.from_processor(processing_class, force_box=True)
        self.data_collator = CountingIdentity(skip_counter if skip_counter is not None else SkipCounter())

    def training_step(self, model, inputs, num_items_in_batch=None):
        with logits_processor_in_generate(self.base_model(), self.grammar):  # (b): trl samples inside this step
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with logits_processor_in_generate(self.base_model(), self.grammar):  # (b): and here when it evaluates
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


@contextlib.contextmanager
def logits_processor_in_generate(model, logits_processor):
    """`model.generate` with `logits_processor` (None: none) and nothing else, inside the block (an instance
    attribute, removed after): `constrain_boxes=False` keeps generate from adding its own grammar for grounding
    requests."""
    processors = LogitsProcessorList([] if logits_processor is None else [logits_processor])
    model.generate = functools.partial(type(model).generate, model, logits_processor=processors, constrain_boxes=False)
    try:
        yield model
    finally:
        del model.generate


def unpadded_prompts(chat_template_kwargs) -> dict:
    """trl's `chat_template_kwargs` with GranViTProcessor asked for unpadded rows as lists (adapter (c)): trl passes
    them to `processor.apply_chat_template`, which hands `processor_kwargs` to the processor's call."""
    kwargs = dict(chat_template_kwargs or {})
    kwargs["processor_kwargs"] = {**kwargs.get("processor_kwargs", {}), "padding": False, "return_tensors": None}
    return kwargs


def without_fused_lm_head(model):
    """``model`` without the fused-LM-head ``forward`` trl patches onto a model it trains (an instance attribute that
    calls the class's forward it captured): the next phase, ``save_pretrained`` and any later trl trainer then see the
    model's own forward. Call it on the model a sft / grpo phase returns."""
    model.__dict__.pop("forward", None)
    return model


class CountingIdentity:
    """GRPO's collator (the identity: trl batches raw rows itself) that also counts the records skipped for the rows;
    a prompt comes `num_generations` times per batch, so each image counts once."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, rows: list[dict]) -> list[dict]:
        self.counter.absorb({row.get("image_id", k): row for k, row in enumerate(rows)}.values())
        return rows


# ============================================================================================ the runner's entry
def make_trl_trainer(recipe: dict, name: str, model, processor, train_split, training: dict, counter: SkipCounter,
                     callbacks: list):
    """The Trainer of a recipe phase of stage sft or grpo (train/runner.py's `make_trainer` dispatches here)."""
    phase, data = recipe["phases"][name], recipe["data"]
    stage, seed = phase["stage"], recipe["seed"]
    if data["streaming"]:
        raise UserError(f"phases.{name}: the {stage} stage reads map-style data; set data.streaming: false")
    if stage == "sft":
        builder = TaskBuilder(processor, tasks=phase["tasks"], regions_per_image=data["regions_per_image"],
                              multi_box=data["multi_box"], seed=seed)
        return GranViTSFTTrainer(model=model, args=GranViTSFTConfig(**training),
                                 train_dataset=sft_items(train_split, builder),
                                 data_collator=ConversationCollator(processor=processor, counter=counter),
                                 processing_class=processor, callbacks=callbacks)
    if set(phase["tasks"]) != {"caption2bbox"}:
        raise UserError(f"phases.{name}: the grpo stage rewards grounding; its tasks must be {{caption2bbox: 1.0}}")
    builder = TaskBuilder(processor, tasks={"caption2bbox": 1.0}, regions_per_image=1, multi_box=False, seed=seed)
    return GranViTGRPOTrainer(model=model, args=GranViTGRPOConfig(**training),
                              train_dataset=grounding_prompts(train_split, builder), processing_class=processor,
                              callbacks=callbacks, skip_counter=counter)
