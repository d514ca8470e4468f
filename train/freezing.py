"""Which parameters each GranViT stage trains: per-component ``requires_grad`` masks, LoRA on the language model only,
and the trainable / frozen table every stage logs at start."""

from torch import nn

COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
TRAINED = {
    "1": {"vision_tower", "multi_modal_projector"},
    "2": {"multi_modal_projector", "language_model", "lm_head"},
    "sft": {"multi_modal_projector", "language_model", "lm_head"},
}
# GranViT reads a ViT *hidden state* (config.vision_feature_layer), never the tower's final output, so these modules of
# SigLIP / CLIP towers get no gradient. They stay frozen: trained they would only waste optimizer state, and under DDP
# with find_unused_parameters=False a parameter without a gradient is an error.
UNUSED_VISION_MODULES = ("post_layernorm", "head")
# A full regex (PEFT matches a str target with re.fullmatch): the SigLIP/CLIP attention is *also* named q/k/v_proj,
# so a plain list of names would adapt the vision tower too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def component_of(name: str) -> str:
    """Component of a parameter name, also through PEFT prefixes ("base_model.model.model.vision_tower...")."""
    for part in name.split("."):
        if part in COMPONENTS:
            return part
    raise ValueError(f"parameter {name!r} belongs to no GranViT component {COMPONENTS}")


def lora_config(r: int, alpha: int = 16, dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM",
    )


def apply_stage(model: nn.Module, stage: str, lora_r: int = 0, lora_alpha: int = 16, lora_dropout: float = 0.05) -> nn.Module:
    """Set the stage's ``requires_grad`` masks (wrapping the model with LoRA when ``lora_r`` > 0); returns the model."""
    if stage not in TRAINED:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(TRAINED)}")
    if lora_r and stage == "1":
        raise ValueError("LoRA applies to the language model, which stage 1 keeps frozen; set lora_r: 0 for stage 1")
    if lora_r:
        from peft import get_peft_model

        model.requires_grad_(False)  # PEFT then enables only the adapters and the modules_to_save copy
        return get_peft_model(model, lora_config(lora_r, lora_alpha, lora_dropout))
    for name, param in model.named_parameters():
        component = component_of(name)
        unused = component == "vision_tower" and any(m in name.split(".") for m in UNUSED_VISION_MODULES)
        param.requires_grad_(component in TRAINED[stage] and not unused)
    return model


def parameter_table(model: nn.Module, teacher: nn.Module | None = None) -> dict[str, tuple[int, int]]:
    """{component: (trainable, frozen)} parameter counts (shared/tied parameters counted once)."""
    table = {c: [0, 0] for c in COMPONENTS}
    for name, param in model.named_parameters():
        table[component_of(name)][0 if param.requires_grad else 1] += param.numel()
    if teacher is not None:
        table["teacher"] = [0, 0]
        for param in teacher.parameters():
            table["teacher"][0 if param.requires_grad else 1] += param.numel()
    return {k: tuple(v) for k, v in table.items()}


def format_table(table: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'component':<22} {'trainable':>12} {'frozen':>12}"]
    lines += [f"{name:<22} {t:>12,} {f:>12,}" for name, (t, f) in table.items()]
    return "\n".join(lines)
