"""Which parameters each GranViT stage trains: per-component ``requires_grad`` masks (from the stage table,
stages.py), LoRA on the language model only, optional trainable rows of the added box tokens, and the trainable /
frozen table every stage logs at start."""

import torch
from torch import nn

from .stages import COMPONENTS, STAGES, get_stage

# What each stage trains is the stage table's (stages.py); TRAINED is the old name, a view of it.
TRAINED = {name: set(stage.trains) for name, stage in STAGES.items()}
# GranViT reads a ViT *hidden state* (config.vision_feature_layer), never the tower's final output, so these modules of
# SigLIP / CLIP towers get no gradient. They stay frozen: trained they would only waste optimizer state, and under DDP
# with find_unused_parameters=False a parameter without a gradient is an error.
UNUSED_VISION_MODULES = ("post_layernorm", "head")
# A full regex (PEFT matches a str target with re.fullmatch): the SigLIP/CLIP attention is *also* named q/k/v_proj,
# so a plain list of names would adapt the vision tower too.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Attribute set on an embedding / lm_head parameter of which only some rows train (the rest get a zero gradient).
ROWS = "_granvit_trainable_rows"


def component_of(name: str) -> str:
    """Component of a parameter name, also through PEFT prefixes ("base_model.model.model.vision_tower...")."""
    for part in name.split("."):
        if part in COMPONENTS:
            return part
    raise ValueError(f"parameter {name!r} belongs to no GranViT component {COMPONENTS}")


def component_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{component: module} of a GranViTForConditionalGeneration (unwrapped)."""
    return {"vision_tower": model.model.vision_tower, "multi_modal_projector": model.model.multi_modal_projector,
            "language_model": model.model.language_model, "lm_head": model.lm_head}


def new_token_ids(config) -> list[int]:
    """Ids of the tokens a box-token build added to the LLM's vocabulary: ``<box>``, ``</box>``, ``<coord_*>``."""
    if config.box_format != "tokens":
        raise ValueError("train_new_token_rows needs box_format='tokens': the text format adds no box tokens")
    start, n = config.coord_token_start_id, config.num_coord_bins
    return sorted({config.box_start_token_id, config.box_end_token_id, *range(start, start + n)})


def lora_config(r: int, alpha: int = 16, dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM",
    )


def apply_stage(
    model: nn.Module,
    stage: str,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    trainable_rows: list[int] | None = None,
) -> nn.Module:
    """Set the stage's ``requires_grad`` masks (wrapping the model with LoRA when ``lora_r`` > 0); returns the model.

    ``trainable_rows``: token ids whose input-embedding and ``lm_head`` rows train even though the language model is
    frozen (stage 1 with ``box_format="tokens"``: the frozen LLM can then learn to read the new box tokens). Those
    parameters get ``requires_grad`` and a gradient hook that zeroes every other row; they must not be weight-decayed
    (``GranViTTrainer.create_optimizer`` puts them in a group without decay), so the other rows stay bitwise fixed.
    """
    trains = get_stage(stage).trains
    if lora_r and "language_model" not in trains:
        raise ValueError(f"LoRA applies to the language model, which stage {stage} keeps frozen; set lora_r: 0")
    _clear_rows(model)
    if lora_r:
        from peft import get_peft_model

        model.requires_grad_(False)  # PEFT then enables only the adapters and the modules_to_save copy
        return get_peft_model(model, lora_config(lora_r, lora_alpha, lora_dropout))
    for name, param in model.named_parameters():
        component = component_of(name)
        unused = component == "vision_tower" and any(m in name.split(".") for m in UNUSED_VISION_MODULES)
        param.requires_grad_(component in trains and not unused)
    if trainable_rows:
        if {"language_model", "lm_head"} <= trains:
            raise ValueError(f"stage {stage} trains the whole language model already; trainable_rows adds nothing")
        rows = torch.tensor(sorted(set(trainable_rows)), dtype=torch.long)
        for param in {id(p): p for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            _train_rows(param, rows)
    return model


def _train_rows(param: nn.Parameter, rows: torch.Tensor) -> None:
    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    mask[rows.to(param.device)] = 1
    param.requires_grad_(True)
    setattr(param, ROWS, rows)
    param._granvit_row_hook = param.register_hook(lambda grad: grad * mask.to(grad.dtype))


def _clear_rows(model: nn.Module) -> None:
    for param in model.parameters():
        if hasattr(param, ROWS):
            param._granvit_row_hook.remove()
            delattr(param, ROWS)
            del param._granvit_row_hook


def parameter_table(model: nn.Module, teacher: nn.Module | None = None) -> dict[str, tuple[int, int]]:
    """{component: (trainable, frozen)} parameter counts (shared/tied parameters counted once); rows trained inside a
    frozen component are counted as their own entry, ``new_token_rows``."""
    table = {c: [0, 0] for c in COMPONENTS}
    for name, param in model.named_parameters():
        rows = getattr(param, ROWS, None)
        if rows is not None:
            row_params = len(rows) * param[0].numel()
            table.setdefault("new_token_rows", [0, 0])[0] += row_params
            table[component_of(name)][1] += param.numel() - row_params
        else:
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
