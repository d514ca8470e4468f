"""A training recipe: one YAML file that says what to train from, on what, and in which phases.

The dataclasses below are its format: every key, its default and what it means, in one place. ``load_recipe`` reads a
file (train/configs/*.yaml) and its ``key=value`` overrides into them and returns the recipe as a plain dict with
every default filled in (code reads ``recipe["eval"]["every"]``, never ``.get(key, default)``). A recipe is checked
whole before any work starts, each problem one line naming the key: an unknown or misspelt key (with the nearest valid
one), a value of the wrong type, and settings that contradict each other (``check_recipe``).

    output_dir: runs/x
    data:  {path: null, synth: {...}, sizes: {train: 4000, val: 64, test: 300}, regions_per_image: 100}
    model: {vision: embedded, llm: embedded, box_format: tokens, num_coord_bins: 32}
    training: {learning_rate: 5.0e-4, ...}   # GranViTTrainingArguments for every phase
    phases:                                  # in order; a phase's own `training` overrides the recipe's
      stage1: {stage: "1", tasks: {bbox2caption: 1.0}, training: {max_steps: 600}}
      stage2: {stage: "2", tasks: {caption2bbox: 1.0, bbox2caption: 1.0}, training: {max_steps: 600}}
      grpo: {stage: grpo, tasks: {caption2bbox: 1.0}, training: {num_generations: 4}}   # sft / grpo: also trl's
                                             # SFTConfig / GRPOConfig fields (train/trl_stages.py)
    eval: {every: 250, val_regions: 128, probe_images: 600}

Overrides are dotted paths with YAML values: ``phases.stage2.training.max_steps=50``, ``model.box_format=text`` (which
also turns the token-only settings off: carry_box_format). A mapping given ``null`` takes its default.
``training`` and each phase's ``training`` stay mappings: their keys are checked against the stage's arguments class
(GranViTTrainingArguments, or trl's configs for sft / grpo), their values by that class when the phase starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..box_codec_granvit import BOX_FORMATS
from ..console import UserError, load_yaml
from ..grounding_granvit import NEGATIVE_TASK
from .data.noise import AnnotationNoise
from .data.synth import synth_config
from .data.tasks import TASKS
from .fields import apply_overrides, refuse_unknown, typed
from .parts.recipe import from_granvit_recipe, load_parts_recipe
from .stages import STAGES, TRL_STAGES

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}


# ============================================================================================ the format
@dataclass
class DataRecipe:
    """The images: a Gran folder, or a synthetic set written once into {output_dir}/data."""

    path: str | None = None  # a Gran dataset folder; null: the synthetic set of `synth` and `sizes`
    splits: dict[str, str] = field(default_factory=dict)  # train / val / test -> the folder's split (missing: same name)
    synth: dict = field(default_factory=dict)  # the synthetic set's SynthConfig fields (+ preset), train/data/synth.py
    sizes: dict[str, int] | None = None  # images per split of the synthetic set
    regions_per_image: int = 4  # queries asked of an image (its regions sampled per task), all in the same batch
    multi_box: bool = True  # a Caption2Bbox answer lists every region sharing the caption (else: no such query)
    streaming: bool = False  # read data.path as a stream (datasets' streaming): sets larger than the disk
    train_images: int | None = None  # train on the first N images only; null: all
    # the training regions corrupted as a data engine's errors would (data/noise.py AnnotationNoise: jitter, miss,
    # spurious, wrong_caption, filters, seed); validation and test keep the true ones; null: none
    annotation_noise: dict | None = None

    def __post_init__(self):
        self.splits = {**DEFAULT_SPLITS, **self.splits}


@dataclass
class ModelRecipe:
    """The starting model: a GranViT checkpoint, or a vision tower + a causal LLM composed by granvit-build's code."""

    checkpoint: str | None = None  # a GranViT folder to start from (the rest of this section is then unused)
    # a Hub id or folder; embedded: the shipped parts (pretrained_parts/, granvit-parts); pretrain: trained here from
    # the recipe's `parts` section and cached by hash
    vision: str | None = None
    llm: str | None = None  # the same choices as vision
    box_format: str = "tokens"  # tokens: <box><coord_*>x4</box>; text: "[x1, y1, x2, y2]" in the LLM's digits
    num_coord_bins: int | None = None  # null: the LLM's own coordinate tokens' number, else GranViTConfig's (1000)
    spatial_merge_size: int = 1  # n x n patches merged into one image token
    vision_feature_layer: int = -1  # the ViT hidden state the projector reads
    bbox2caption_template: str | None = None  # the region-caption prompt; null: the processor's
    caption2bbox_template: str | None = None  # the grounding prompt; null: the processor's
    max_tiles: int = 0  # 0: one image; N: a thumbnail + up to N tiles (tiling_granvit.py)


@dataclass
class PhaseRecipe:
    """One phase: a stage (stages.STAGES: what it trains, its Trainer), the task mix, its own training overrides."""

    stage: str | int = ""  # 1, 2, projector, joint, sft, grpo; kept as text
    tasks: dict[str, float] = field(default_factory=dict)  # task -> share of the image's queries (train/data/tasks.py)
    training: dict = field(default_factory=dict)  # arguments over the recipe's `training`

    def __post_init__(self):
        self.stage = str(self.stage)


@dataclass
class EvalRecipe:
    """Scores while training (granvit-quickstart's held-out test included)."""

    every: int | None = None  # validation every N steps; 0: at the start and after each phase only; null: never
    val_regions: int | None = None  # validation regions; null: the whole val split
    test_regions: int | None = None  # granvit-quickstart's held-out test regions; null: the whole test split
    batch_size: int = 64  # validation decoding batch
    probe_images: int | None = None  # the ViT's region probe (eval/probe.py), fit on this many training images, at the
                                     # start and after each phase that trains the ViT; null: no probe


@dataclass
class Recipe:
    output_dir: str = "runs/granvit"  # every phase writes under it; "{output_dir}" in any string is filled in
    seed: int = 0  # data order, region sampling, the synthetic set, and the parts' seed unless `parts` sets one
    threads: int = 0  # torch threads per process; 0: torch's default
    processes: int | str = "auto"  # data-parallel workers; auto: one per core on a CPU, one on a GPU (train/launch.py)
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    # with model.vision / llm: pretrain, the parts trained here (train/parts/recipe.py PartsRecipe, + its defaults from
    # this recipe: the seed, data.synth's scenes, model's box settings)
    parts: dict | None = None
    training: dict = field(default_factory=dict)  # GranViTTrainingArguments for every phase
    phases: dict[str, PhaseRecipe] = field(default_factory=dict)  # in the order they run
    eval: EvalRecipe = field(default_factory=EvalRecipe)


SECTIONS = {"data": DataRecipe, "model": ModelRecipe, "eval": EvalRecipe}


def section(name: str, values: dict | None = None) -> dict:
    """Section `name` (data, model, eval) of `values` with every default filled in: what code that replaces a loaded
    recipe's section writes (``recipe["eval"] = section("eval")``: no validation)."""
    return dataclasses.asdict(typed(SECTIONS[name], values, name, "recipe"))


# ============================================================================================ loading
def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The YAML recipe with `key=value` overrides applied, typed, its defaults filled in, "{output_dir}" filled in
    and checked (check_recipe): a dict of the Recipe dataclass's shape."""
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (output_dir, data, model, phases, ...)")
    apply_overrides(raw, list(overrides), "phases.stage1.training.max_steps=10")
    recipe = dataclasses.asdict(typed(Recipe, raw, "", str(path)))
    recipe = _format(recipe, output_dir=recipe["output_dir"])
    carry_box_format(recipe)
    check_recipe(recipe, str(path))
    return recipe


# Settings that only mean something for the 6-token box format, and their value for the text format: a recipe written
# for tokens (the main job's) switched to text with one override keeps working.
TOKENS_ONLY = {"soft_coord_sigma": 0.0, "train_new_token_rows": False}


def carry_box_format(recipe: dict) -> None:
    """With ``model.box_format: text``, the settings that need box tokens take their text-format values."""
    if recipe["model"]["box_format"] != "text":
        return
    for training in [recipe["training"]] + [phase["training"] for phase in recipe["phases"].values()]:
        for key, value in TOKENS_ONLY.items():
            if key in training:
                training[key] = value


def check_recipe(recipe: dict, source: str = "recipe") -> None:
    """What the types cannot say, before any work: stages and tasks, and settings that need each other."""
    data, model = recipe["data"], recipe["model"]
    if model["box_format"] not in BOX_FORMATS:
        raise UserError(f"{source}: model.box_format must be one of {BOX_FORMATS}, not {model['box_format']!r}")
    processes = recipe["processes"]
    if processes != "auto" and not (isinstance(processes, int) and processes >= 1):
        raise UserError(f"{source}: processes must be 'auto' or a positive number, not {processes!r}")
    if not data["path"] and not (data["sizes"] or {}).get("train"):
        raise UserError(f"{source}: set data.path (a Gran dataset folder) or data.sizes.train (synthetic images)")
    synth_config(data["synth"], "data.synth", source)
    AnnotationNoise.from_recipe(data["annotation_noise"], source)  # its keys, types and ranges, one line each
    if data["annotation_noise"] and data["streaming"]:
        raise UserError(f"{source}: data.annotation_noise needs a map-style training split (data.streaming: false)")
    if not model["checkpoint"] and not (model["vision"] and model["llm"]):
        raise UserError(f"{source}: set model.checkpoint, or model.vision and model.llm (ids, folders or 'embedded')")
    if "pretrain" in (model["vision"], model["llm"]):
        from_granvit_recipe(recipe, source)  # unknown keys and wrong types in parts.* are refused there
    elif recipe["parts"] is not None:
        raise UserError(f"{source}: a parts section is for model.vision / model.llm: pretrain (parts trained here); "
                        "the embedded parts are shipped (train/configs/parts.yaml, granvit-parts)")
    _check_bins(recipe, source)
    if not recipe["phases"]:
        raise UserError(f"{source}: no phases (add e.g. phases: {{stage1: {{stage: '1', tasks: {{bbox2caption: 1.0}}}}}})")
    for name in recipe["phases"]:
        _check_phase(recipe, name, source)


def _check_bins(recipe: dict, source: str) -> None:
    """An LLM that already reads box tokens (the embedded or pretrained LM part) fixes the number of bins."""
    model = recipe["model"]
    if model["checkpoint"] or model["box_format"] != "tokens" or model["num_coord_bins"] is None:
        return
    if model["llm"] == "pretrain":
        lm = from_granvit_recipe(recipe, source).lm
    elif model["llm"] == "embedded":
        lm = load_parts_recipe().lm
    else:
        return
    if "tokens" in lm.box_formats and lm.num_coord_bins != model["num_coord_bins"]:
        raise UserError(f"{source}: model.num_coord_bins={model['num_coord_bins']}, but the {model['llm']} LM part "
                        f"reads {lm.num_coord_bins} coordinate tokens; set model.num_coord_bins={lm.num_coord_bins} "
                        "(or null), or model.box_format=text")


def _check_phase(recipe: dict, name: str, source: str) -> None:
    phase, where = recipe["phases"][name], f"{source}: phases.{name}"
    if phase["stage"] not in STAGES:
        raise UserError(f"{where}.stage must be one of {sorted(STAGES)}, not {phase['stage']!r}")
    stage, trains = phase["stage"], STAGES[phase["stage"]].trains
    tasks = phase["tasks"]
    if not tasks:
        raise UserError(f"{where} has no tasks (e.g. tasks: {{bbox2caption: 1.0}})")
    refuse_unknown(tasks, TASKS, f"phases.{name}.tasks", source)
    bad = {task: share for task, share in tasks.items() if not 0 <= share <= 1}
    if bad:
        raise UserError(f"{where}.tasks: shares are in [0, 1], not {bad}")
    arguments = STAGES[stage].arguments_class()
    fields = {f.name: f for f in dataclasses.fields(arguments)}
    refuse_unknown(recipe["training"], fields, "training", source)
    refuse_unknown(phase["training"], fields, f"phases.{name}.training", source)

    def value(key):
        return phase_setting(recipe, name, key)

    conflicts = []
    if stage == "1" and tasks.get(NEGATIVE_TASK):
        conflicts.append(f"{NEGATIVE_TASK} has no region for stage 1's distillation; use it in a stage-2 phase")
    if stage in TRL_STAGES and recipe["data"]["streaming"]:
        conflicts.append(f"the {stage} stage reads map-style data; set data.streaming: false")
    if stage == "grpo":
        if set(tasks) != {"caption2bbox"}:
            conflicts.append("the grpo stage rewards grounding; its tasks must be {caption2bbox: 1.0}")
        for key, why in (("use_vllm", "vLLM has no GranViT model implementation"),
                         ("sync_ref_model", "the KL reference is the frozen starting model"),
                         ("soft_coord_sigma", "it shapes a cross-entropy, which the grpo stage does not have")):
            if value(key):
                conflicts.append(f"{key}={value(key)}: {why}; set it to {fields[key].default}")
    if value("lora_r") and "language_model" not in trains:
        conflicts.append(f"lora_r={value('lora_r')}: LoRA adapts the language model, which stage {stage} keeps frozen; "
                         f"set it in the phases that train it (phases.<name>.training.lora_r)")
    box_format = checkpoint_box_format(recipe)
    if value("train_new_token_rows"):
        if {"language_model", "lm_head"} <= trains:
            conflicts.append(f"train_new_token_rows: stage {stage} trains the whole language model already; "
                             "set it in the stage-1 phase only")
        elif box_format == "text":
            conflicts.append("train_new_token_rows needs box_format tokens: the text format adds no box tokens")
    if value("soft_coord_sigma") and box_format == "text" and stage != "grpo":
        conflicts.append("soft_coord_sigma needs box_format tokens (text coordinates are several digit tokens); set it to 0")
    if value("distill_feature_norm") not in ("layer_norm", "none"):
        conflicts.append(f"distill_feature_norm must be 'layer_norm' or 'none', not {value('distill_feature_norm')!r}")
    if not 0 <= value("ema_decay") <= 1:
        conflicts.append(f"ema_decay must be in [0, 1], not {value('ema_decay')}")
    if conflicts:
        raise UserError(f"{where} (stage {stage}): {conflicts[0]}")


def checkpoint_box_format(recipe: dict) -> str | None:
    """The box format the phases train: the recipe's, or its starting checkpoint's (None while that is not written)."""
    model = recipe["model"]
    if not model["checkpoint"]:
        return model["box_format"]
    config = Path(model["checkpoint"]) / "config.json"
    return json.loads(config.read_text()).get("box_format", "tokens") if config.is_file() else None


# ============================================================================================ reading
def phase_training(recipe: dict, name: str) -> dict:
    """The GranViTTrainingArguments values of one phase: the recipe's `training`, then the phase's own."""
    return _merge(recipe["training"], recipe["phases"][name]["training"])


def phase_setting(recipe: dict, name: str, key: str):
    """One training argument of a phase: its value in the recipe, else its default in the stage's arguments class."""
    training = phase_training(recipe, name)
    if key in training:
        return training[key]
    return next(f.default for f in dataclasses.fields(STAGES[recipe["phases"][name]["stage"]].arguments_class())
                if f.name == key)


def dump_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))


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
