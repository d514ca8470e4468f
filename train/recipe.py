"""A training recipe: one YAML file that says what to train from, on what, and in which phases.

    output_dir: runs/x                     # every phase writes under it; "{output_dir}" in strings is filled in
    seed: 0
    threads: 0                             # torch threads (0 = torch's default)
    processes: auto                        # data-parallel workers: auto = one per core on a CPU (train/launch.py)
    data:  {path: DIR | null, synth: {...}, sizes: {train: N, val: N, test: N}, regions_per_image: 4, streaming: false,
            annotation_noise: {jitter, miss, spurious, wrong_caption, filters, seed}}   # data/noise.py: train only
    model: {checkpoint: DIR | null, vision: ID | embedded | pretrain, llm: ID | embedded | pretrain,
            box_format: tokens, num_coord_bins: 1000}
                                           # embedded: the shipped parts (pretrained_parts/, granvit-parts)
    parts: {siglip: {...}, lm: {...}}      # pretrain: parts trained here first (train/parts/recipe.py PartsRecipe;
                                           # + parallel, seed: the parts' own seed, default `seed`), cached by hash
    training: {...}                        # GranViTTrainingArguments for every phase
    phases:                                # in order; each: a stage of freezing.TRAINED, its tasks and training overrides
      stage1: {stage: "1", tasks: {bbox2caption: 1.0}, training: {max_steps: 600}}
      stage2: {stage: "2", tasks: {caption2bbox: 1.0, bbox2caption: 1.0}, training: {max_steps: 600}}
      grpo: {stage: grpo, tasks: {caption2bbox: 1.0}, training: {num_generations: 4}}   # sft / grpo: also
                                           # trl's SFTConfig / GRPOConfig fields (train/trl_stages.py)
    eval: {every: 200, val_regions: 128, test: true, probe_images: 600}   # probe_images: the region probe
                                           # of the ViT at the start and after each phase that trains it

Overrides are dotted paths with YAML values: ``phases.stage2.training.max_steps=50``, ``model.box_format=tokens``.
Unknown keys are errors that name the key (a misspelt key would otherwise be silently ignored).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import yaml

from ..console import UserError, load_yaml

CONFIGS = Path(__file__).parent / "configs"
SECTIONS = {
    "output_dir": None, "seed": None, "threads": None, "processes": None, "data": None, "model": None, "parts": None, "training": None,
    "phases": None, "eval": None,
}
DATA_KEYS = {"path", "splits", "synth", "sizes", "regions_per_image", "multi_box", "streaming", "train_images",
             "annotation_noise"}
MODEL_KEYS = {"checkpoint", "vision", "llm", "box_format", "num_coord_bins", "spatial_merge_size", "vision_feature_layer",
              "bbox2caption_template", "caption2bbox_template", "max_tiles"}
PHASE_KEYS = {"stage", "tasks", "training"}
EVAL_KEYS = {"every", "val_regions", "test", "test_regions", "batch_size", "probe_images"}
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
TRL_STAGES = ("sft", "grpo")  # stages trained by trl's SFTTrainer / GRPOTrainer (train/trl_stages.py)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The YAML recipe with `key=value` overrides applied, checked, and "{output_dir}" filled in."""
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (output_dir, data, model, phases, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} is not key=value (e.g. phases.stage1.training.max_steps=10)")
        set_dotted(raw, key, override_value(value))
    recipe = _format(raw, output_dir=raw.get("output_dir", "runs/granvit"))
    carry_box_format(recipe)
    check_recipe(recipe, str(path))
    return recipe


# Settings that only mean something for the 6-token box format, and their value for the text format: a recipe written
# for tokens (the main job's) switched to text with one override keeps working.
TOKENS_ONLY = {"soft_coord_sigma": 0.0, "train_new_token_rows": False}


def carry_box_format(recipe: dict) -> None:
    """With ``model.box_format: text``, the settings that need box tokens take their text-format values."""
    if (recipe.get("model") or {}).get("box_format") != "text":
        return
    sections = [recipe.get("training")] + [phase.get("training") for phase in (recipe.get("phases") or {}).values()]
    for training in sections:
        for key, value in TOKENS_ONLY.items():
            if isinstance(training, dict) and key in training:
                training[key] = value


def check_recipe(recipe: dict, source: str = "recipe") -> None:
    """Unknown keys, unknown stages and tasks, and impossible combinations, as one-line errors."""
    from ..processing_granvit import BOX_FORMATS
    from .data.synth import SynthConfig
    from .data.tasks import TASKS
    from .freezing import TRAINED
    from .parts.recipe import from_granvit_recipe
    from .trainers import GranViTTrainingArguments

    def unknown(keys, known, where):
        bad = sorted(set(keys) - set(known))
        if bad:
            raise UserError(f"{source}: unknown key(s) {bad} in {where}; known: {sorted(known)}")

    unknown(recipe, SECTIONS, "the recipe")
    data, model = recipe.get("data") or {}, recipe.get("model") or {}
    unknown(data, DATA_KEYS, "data")
    unknown(data.get("synth") or {}, {f.name for f in dataclasses.fields(SynthConfig)} | {"preset"}, "data.synth")
    unknown(model, MODEL_KEYS, "model")
    if model.get("box_format", "tokens") not in BOX_FORMATS:
        raise UserError(f"{source}: model.box_format must be one of {BOX_FORMATS}, not {model['box_format']!r}")
    if recipe.get("parts") is not None:
        if "pretrain" not in (model.get("vision"), model.get("llm")):
            raise UserError(f"{source}: a parts section is for model.vision / model.llm: pretrain (parts trained here); "
                            "the embedded parts are shipped (train/configs/parts.yaml, granvit-parts)")
        from_granvit_recipe(recipe)  # unknown keys in parts.* are refused there
    unknown(recipe.get("eval") or {}, EVAL_KEYS, "eval")
    argument_names = {f.name for f in dataclasses.fields(GranViTTrainingArguments)}
    unknown(recipe.get("training") or {}, argument_names, "training")
    phases = recipe.get("phases") or {}
    if not phases:
        raise UserError(f"{source}: no phases (add e.g. phases: {{stage1: {{stage: '1', tasks: {{bbox2caption: 1.0}}}}}})")
    for name, phase in phases.items():
        unknown(phase, PHASE_KEYS, f"phases.{name}")
        if str(phase.get("stage")) not in TRAINED:
            raise UserError(f"{source}: phases.{name}.stage must be one of {sorted(TRAINED)}, not {phase.get('stage')!r}")
        unknown(phase.get("tasks") or {}, TASKS, f"phases.{name}.tasks")
        if not phase.get("tasks"):
            raise UserError(f"{source}: phases.{name} has no tasks (e.g. tasks: {{bbox2caption: 1.0}})")
        stage_arguments = argument_names
        if str(phase.get("stage")) in TRL_STAGES:  # their phases also take trl's SFTConfig / GRPOConfig fields
            from .trl_stages import config_class

            stage_arguments = {f.name for f in dataclasses.fields(config_class(str(phase["stage"])))}
        unknown(phase.get("training") or {}, stage_arguments, f"phases.{name}.training")
    if not data.get("path") and not (data.get("sizes") or {}).get("train"):
        raise UserError(f"{source}: set data.path (a Gran dataset folder) or data.sizes.train (synthetic images)")
    if not model.get("checkpoint") and not (model.get("vision") and model.get("llm")):
        raise UserError(f"{source}: set model.checkpoint, or model.vision and model.llm (ids, folders or 'embedded')")


def phase_training(recipe: dict, name: str) -> dict:
    """The GranViTTrainingArguments values of one phase: the recipe's `training`, then the phase's own."""
    return _merge(recipe.get("training") or {}, recipe["phases"][name].get("training") or {})


def splits(recipe: dict) -> dict:
    return {**DEFAULT_SPLITS, **((recipe.get("data") or {}).get("splits") or {})}


def dump_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))


def override_value(text: str):
    """A ``key=value`` override's value as YAML, except where YAML 1.1 (which PyYAML follows) surprises: ``1e-3`` is a
    number (read as a string there: a learning rate must not become text) and only ``true`` / ``false`` are booleans
    (``no`` / ``off`` stay words: ``training.save_strategy=no`` is the strategy, not False)."""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def set_dotted(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = config.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: {p} is not a section")
        config = child
    config[leaf] = value


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _format(value, **names):
    """Fill `{output_dir}` in string values."""
    if isinstance(value, dict):
        return {k: _format(v, **names) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, **names) for v in value]
    return value.format(**names) if isinstance(value, str) and "{output_dir}" in value else value
