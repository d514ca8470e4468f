"""The one table of GranViT's training stages: for each, what it trains, its Trainer class and its arguments class.

``freezing.apply_stage`` sets the ``requires_grad`` masks from ``trains``; the runner builds ``trainer_class()`` with
``arguments_class()``; the recipe checks a phase's ``training`` keys against the arguments' fields. The classes are
named here as ``"module:Class"`` and imported only when asked for, so this table sits below the modules that define
them (trainers.py imports freezing.py, which reads this table; trl_stages.py imports trl) and costs nothing to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
TRL_MODULE = "trl_stages"  # the stages whose Trainer lives there are trl's SFTTrainer / GRPOTrainer


@dataclass(frozen=True)
class Stage:
    trains: frozenset[str]  # the components (COMPONENTS) whose parameters learn; the others stay frozen
    trainer: str  # "module:Class" of its Trainer, a module of granvit.train
    arguments: str  # "module:Class" of its TrainingArguments

    @property
    def uses_trl(self) -> bool:
        """Trained by trl (SFTTrainer / GRPOTrainer): the runner hands such phases to trl_stages.make_trl_trainer."""
        return self.trainer.partition(":")[0] == TRL_MODULE

    def trainer_class(self) -> type:
        return _load(self.trainer)

    def arguments_class(self) -> type:
        return _load(self.arguments)


def _load(name: str) -> type:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


ARGUMENTS = "trainers:GranViTTrainingArguments"
HEAD = frozenset({"multi_modal_projector", "language_model", "lm_head"})  # projector + LLM, the ViT frozen
STAGES = {
    # LLaVA's alignment step: only the new projector learns, both pretrained parts frozen (the start of stage 1 when
    # a recipe asks for it: a random projector would otherwise send noise gradients into the pretrained ViT).
    "projector": Stage(frozenset({"multi_modal_projector"}), "trainers:ProjectorTrainer", ARGUMENTS),
    # The paper's stage 1: the LLM frozen, so the only way to lower the caption loss is for the ViT to put what is in
    # the box into the patches under the box; a trainable LLM would soak up the signal.
    "1": Stage(frozenset({"vision_tower", "multi_modal_projector"}), "trainers:Stage1Trainer", ARGUMENTS),
    # The paper's stage 2: the ViT frozen (the paper measured no gain from tuning it here).
    "2": Stage(HEAD, "trainers:Stage2Trainer", ARGUMENTS),
    # SFT after stage 2, on conversations, with trl's SFTTrainer: what stage 2 trains.
    "sft": Stage(HEAD, "trl_stages:GranViTSFTTrainer", "trl_stages:GranViTSFTConfig"),
    # Grounding refined by RL on trl's GRPOTrainer: what stage 2 trains; the reward only scores the LLM's boxes, and a
    # frozen ViT keeps the encoder the earlier stages made (the package's product) as it was.
    "grpo": Stage(HEAD, "trl_stages:GranViTGRPOTrainer", "trl_stages:GranViTGRPOConfig"),
    # Every part at once: not the paper's method; the experiments' "joint" arm.
    "joint": Stage(frozenset(COMPONENTS), "trainers:JointTrainer", ARGUMENTS),
}
TRL_STAGES = tuple(name for name, stage in STAGES.items() if stage.uses_trl)  # ("sft", "grpo")


def get_stage(name: str) -> Stage:
    """The stage called ``name``, or a ValueError naming it and the stages there are."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {list(STAGES)}")
    return STAGES[name]


__all__ = ["COMPONENTS", "STAGES", "Stage", "TRL_STAGES", "get_stage"]
