"""The one training runner: a recipe (train/recipe.py) in, trained phases out. Every entry point calls it:
``granvit-quickstart`` (the whole pipeline + a report), ``granvit-train --stage N`` (the phases of one stage) and the
experiments (many recipes).

    data    a Gran folder, or the synthetic set written into {output_dir}/data
    model   a granvit-build checkpoint, or built here from a vision tower + a causal LLM (`granvit-build`'s code);
            "embedded" parts are pretrained first (train/parts.py) and cached
    phases  in recipe order, each a stage Trainer (trainers.TRAINERS; stages sft / grpo: trl's trainers, trl_stages.py)
            on the phase's tasks, one item per image with every query of that image (data/tasks.py), validation scores
            every `eval.every` steps

In one process the model passes from phase to phase in memory. `granvit-train` runs one stage per process instead:
each phase saves `{output_dir}/<phase>/final` and a later phase starts from the last earlier phase's `final`, so the
two ways build the same Trainer on the same weights, data and losses (tests/test_runner.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..console import UserError
from .data.noise import AnnotationNoise, add_annotation_noise
from .freezing import TRAINED
from .launch import describe, is_main_process, split_batch
from .data.synth import synth_config as scene_config
from .recipe import phase_setting, phase_training
from .stages import TRL_STAGES

logger = logging.getLogger(__name__)
SYNTH_DIR = "data"  # under output_dir, when the recipe generates the synthetic set
BUILD_DIR = "build"  # the composed, untrained checkpoint (what `granvit-build` would write)


@dataclass
class RunState:
    """What a run accumulates across phases: the validation curve, per-phase scores, timings, skipped rows."""

    curve: dict = field(default_factory=lambda: {"loss": [], "val": []})
    phase_scores: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    annotation_noise: dict = field(default_factory=dict)  # what data.annotation_noise did to the training regions
    trained_tasks: list = field(default_factory=list)
    steps: int = 0
    last_trainer: object = None  # the Trainer of the last phase (its log history, teacher, state)


# ============================================================================================ data
def synth_config(recipe: dict):
    """The SynthConfig of the recipe's synthetic set (data.synth)."""
    return scene_config(recipe["data"]["synth"])


def data_dir(recipe: dict) -> Path:
    path = recipe["data"]["path"]
    return Path(path) if path else Path(recipe["output_dir"]) / SYNTH_DIR


def prepare_data(recipe: dict, log=print) -> Path:
    """The Gran folder of the recipe; the synthetic set is generated (once) when `data.path` is unset."""
    from .data.synth import write_synth

    folder = data_dir(recipe)
    data = recipe["data"]
    if data["path"]:
        if not folder.exists():
            raise UserError(f"data.path {folder}: no such folder; pass a Gran dataset folder (granvit-data synth/convert)")
        return folder
    if not (folder / "README.md").exists():
        sizes = {k: int(v) for k, v in data["sizes"].items()}
        log(f"  synthetic set -> {folder} ({', '.join(f'{v} {k}' for k, v in sizes.items())} images)")
        write_synth(str(folder), sizes, synth_config(recipe), seed=recipe["seed"])
    return folder


def load_split(folder: Path, split: str, streaming: bool = False):
    from datasets import load_dataset

    return load_dataset(str(folder), split=split, streaming=streaming)


def has_split(folder: Path, split: str) -> bool:
    return any((folder / "data").glob(f"{split}-*.parquet"))


# ============================================================================================ model
def embedded_parts(recipe: dict, log=print) -> tuple[str, str, dict]:
    """(vision folder or id, llm folder or id, the parts' quality reports) of the recipe's model section.

    ``embedded``: the shipped parts (pretrained_parts/, checked against train/configs/parts.yaml's hash);
    ``pretrain``: parts of the recipe's own ``parts:`` section, trained here once and cached by their hash (two
    parts that both need training train side by side, one process each, with ``parts.parallel``); anything else is a
    Hub id or a folder, used as it is.
    """
    from .parts.cached import cached_report, pretrain_cached
    from .parts.recipe import from_granvit_recipe
    from .parts.shipped import shipped_part

    model = recipe["model"]
    sources, reports = {}, {}
    for key, name in (("vision", "siglip"), ("llm", "lm")):
        if model[key] == "embedded":
            folder, entry = shipped_part(name)
            sources[name] = str(folder)
            reports[name] = {**entry["figures"], "hash": entry["hash"], "seconds": entry["seconds"], "source": "shipped"}
            log(f"  {PART_TITLES[name]}: {folder} (hash {entry['hash']}): {format_figures(entry['figures'])}")
    wanted = [name for key, name in (("vision", "siglip"), ("llm", "lm")) if model[key] == "pretrain"]
    if wanted:
        parts = from_granvit_recipe(recipe)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not all(cached_report(n, parts) for n in wanted):
            raise UserError("parts with `pretrain` are trained in a single process: run the recipe once without a "
                            "distributed launcher (e.g. granvit-train --stage 1 ... phases.stage1.training.max_steps=0)")
        for name, (folder, report) in pretrain_cached(wanted, parts, log=log).items():
            sources[name], reports[name] = str(folder), report
    return sources.get("siglip", model["vision"]), sources.get("lm", model["llm"]), reports


PART_TITLES = {"siglip": "embedded SigLIP", "lm": "embedded LM"}
FIGURES = {"retrieval_top1": "zero-shot retrieval", "probe_shape_acc": "region probe shape",
           "probe_colour_acc": "colour", "perplexity": "perplexity", "bbox2caption_exact_tokens": "describe exact",
           "caption2bbox_exact_tokens": "find exact", "bbox2caption_exact_text": "describe exact (text boxes)",
           "caption2bbox_exact_text": "find exact (text boxes)"}


def format_figures(figures: dict) -> str:
    return ", ".join(f"{label} {figures[key]:.3f}" if key != "perplexity" else f"{label} {figures[key]:.2f}"
                     for key, label in FIGURES.items() if key in figures)


def own_parts_first(recipe: dict) -> None:
    """Before a multi-process launch: a recipe that pretrains its own parts (``pretrain``) makes them here, in one
    process, so that the workers load them from the cache instead of each training them."""
    model = recipe["model"]
    if "pretrain" in (model["vision"], model["llm"]):
        embedded_parts(recipe)


def build_model(recipe: dict, state: RunState, log=print):
    """(model, processor): the recipe's starting checkpoint, or the parts composed by granvit-build's code path."""
    from ..modeling_granvit import GranViTForConditionalGeneration
    from ..processing_granvit import GranViTProcessor
    from .build import build_granvit, save_granvit

    model_cfg = recipe["model"]
    if model_cfg["checkpoint"]:
        checkpoint = model_cfg["checkpoint"]
        return GranViTForConditionalGeneration.from_pretrained(checkpoint), GranViTProcessor.from_pretrained(checkpoint)
    vision, llm, state.parts = embedded_parts(recipe, log)
    templates = {k: model_cfg[k] for k in ("bbox2caption_template", "caption2bbox_template") if model_cfg[k] is not None}
    model, processor = build_granvit(
        vision, llm, num_coord_bins=model_cfg["num_coord_bins"], spatial_merge_size=model_cfg["spatial_merge_size"],
        vision_feature_layer=model_cfg["vision_feature_layer"], box_format=model_cfg["box_format"],
        max_tiles=model_cfg["max_tiles"], **templates,
    )
    save_granvit(model, processor, Path(recipe["output_dir"]) / BUILD_DIR)
    log(f"  granvit-build: {vision} + {llm} -> {Path(recipe['output_dir']) / BUILD_DIR} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, box format {processor.box_format})")
    return model, processor


def phase_dir(recipe: dict, name: str) -> Path:
    return Path(recipe["output_dir"]) / name


def starting_checkpoint(recipe: dict, name: str) -> Path | None:
    """The `final` of the last phase before `name` that a previous `granvit-train` run saved, if any."""
    names = list(recipe["phases"])
    for earlier in reversed(names[: names.index(name)]):
        final = phase_dir(recipe, earlier) / "final"
        if (final / "config.json").exists():
            return final
    return None


# ============================================================================================ one phase
def make_trainer(recipe: dict, name: str, model, processor, train_split, state: RunState, evaluate=None):
    """The Trainer of one phase: stage class, arguments, one item per image, the collator and the callbacks."""
    from .data.tasks import ImageQueries, SkipCounter, StreamedImageQueries, TaskBuilder, TaskCollator, as_torch_iterable
    from .data.tasks import skip_counter_callback
    from .trainers import TRAINERS, GranViTTrainingArguments

    phase, data = recipe["phases"][name], recipe["data"]
    stage = phase["stage"]
    training = {"output_dir": str(phase_dir(recipe, name)), "seed": recipe["seed"], **phase_training(recipe, name)}
    training["per_device_train_batch_size"] = split_batch(phase_setting(recipe, name, "per_device_train_batch_size"))
    counter = SkipCounter()
    callbacks = [skip_counter_callback(counter), CurveCallback(name, state, evaluate, recipe["eval"]["every"])]
    if stage in TRL_STAGES:
        from .trl_stages import make_trl_trainer

        return make_trl_trainer(recipe, name, model, processor, train_split, training, counter, callbacks)
    if data["streaming"]:
        # Each rank reads its own shards (split_dataset_by_node); the default would read on rank 0 and dispatch.
        training.setdefault("accelerator_config", {"dispatch_batches": False})
    args = GranViTTrainingArguments(**training)
    builder = TaskBuilder(processor, tasks=phase["tasks"], regions_per_image=data["regions_per_image"],
                          multi_box=data["multi_box"], stage1=stage == "1", seed=recipe["seed"])
    if data["streaming"]:
        from datasets.distributed import split_dataset_by_node

        if args.world_size > 1:  # whole shards per rank when num_shards % world_size == 0
            train_split = split_dataset_by_node(train_split, rank=args.process_index, world_size=args.world_size)
        dataset = as_torch_iterable(StreamedImageQueries(train_split, builder))
    else:
        dataset = ImageQueries(train_split, builder)
    collator = TaskCollator(processor, counter, tasks=args.gradient_balance != "none")
    return TRAINERS[stage](model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=processor, callbacks=callbacks)


class CurveCallback(TrainerCallback):
    """Keeps (global step, losses) across phases and, every `every` steps, a validation score (the learning curve)."""

    def __init__(self, name: str, state: RunState, evaluate, every: int):
        self.name, self.state, self.evaluate, self.every = name, state, evaluate, every
        self.offset = state.steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": self.offset + state.global_step, "phase": self.name, "loss": logs["loss"]}
            entry.update({k: logs[k] for k in ("caption_loss", "distill_loss", "task_grad_cosine", "task_grad_conflicts")
                          if k in logs})
            self.state.curve["loss"].append(entry)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.evaluate and self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            scores = {**self.evaluate(model), "step": self.offset + state.global_step, "phase": self.name}
            self.state.curve["val"].append(scores)
            # above the Trainer's progress bar, not inside its line
            tqdm.write(f"  validation at step {scores['step']} ({self.name}): "
                       f"grounding {scores['grounding_acc50']:.3f}, caption {scores['caption_exact']:.3f}")


def last_complete_checkpoint(phase_folder: str, stage: str) -> str | None:
    """The newest checkpoint that was fully written. The Trainer writes checkpoint folders in place, so a crash while
    saving leaves a partial `checkpoint-N` that `resume_from_checkpoint=True` would pick. `trainer_state.json` is the
    Trainer's last file, and stage 1 writes `ema_teacher.safetensors` after it."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from .ema import TEACHER_FILE

    required = ["trainer_state.json"] + ([TEACHER_FILE] if stage == "1" else [])
    candidates = sorted(Path(phase_folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for checkpoint in reversed(candidates):
        if all((checkpoint / name).is_file() for name in required):
            return str(checkpoint)
        logger.warning("Skipping %s: incomplete (killed while saving?)", checkpoint)
    logger.warning("No complete checkpoint in %s: starting from scratch", phase_folder)
    return None


def run_phase(recipe: dict, name: str, model, processor, train_split, state: RunState, evaluate=None, log=print):
    """Train one phase; returns the trained (unwrapped, LoRA-merged) model."""
    phase = recipe["phases"][name]
    trainer = make_trainer(recipe, name, model, processor, train_split, state, evaluate)
    steps = trainer.args.max_steps
    images, world = trainer.args.per_device_train_batch_size, trainer.args.world_size
    per_step = f"{images * world} images ({world} x {images})" if world > 1 else f"{images} images"
    log(f"[{name}] stage {phase['stage']}: {steps} steps x {per_step}, tasks {phase['tasks']}")
    start = time.time()
    resume = trainer.args.resume_from_checkpoint
    if str(resume).lower() in ("true", "last"):
        resume = last_complete_checkpoint(str(phase_dir(recipe, name)), str(phase["stage"]))
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    state.timings[f"{name}_s"] = seconds
    state.timings[f"{name}_steps"] = steps
    state.timings[f"{name}_steps_per_s"] = steps / seconds if seconds else None
    state.steps += steps
    state.skipped.update({f"{name}/{k}": v for k, v in trainer.data_collator.counter.as_dict().items()})
    for task in phase["tasks"]:
        if task not in state.trained_tasks:
            state.trained_tasks.append(task)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(trained, "merge_and_unload"):  # LoRA: keep the adapter next to the phase, continue with merged weights
        if trainer.is_world_process_zero():
            trained.save_pretrained(str(phase_dir(recipe, name) / "adapter"))
        trained = trained.merge_and_unload()
    trained.__dict__.pop("forward", None)  # the sft / grpo stages' fused LM head, patched on by trl (trl_stages.py)
    trained.requires_grad_(True)
    if evaluate is not None and trainer.is_world_process_zero():
        if not state.curve["val"] or state.curve["val"][-1]["step"] != state.steps:
            state.curve["val"].append({**evaluate(trained), "step": state.steps, "phase": name})
        state.phase_scores[name] = {k: v for k, v in state.curve["val"][-1].items() if k not in ("step", "phase")}
    return trained, trainer


# ============================================================================================ the run
def load_checkpoint(folder) -> tuple:
    from ..modeling_granvit import GranViTForConditionalGeneration
    from ..processing_granvit import GranViTProcessor

    return GranViTForConditionalGeneration.from_pretrained(folder), GranViTProcessor.from_pretrained(folder)


def _starting_model(recipe: dict, names: list[str], only, start_from, state: RunState, log) -> tuple:
    """(model, processor, tasks it was trained on): given, the saved `final` of an earlier phase, or built."""
    checkpoint = starting_checkpoint(recipe, names[0]) if only and start_from is None else None
    if start_from is not None:
        model, processor = start_from
    elif checkpoint is not None:
        log(f"  starting from {checkpoint}")
        model, processor = load_checkpoint(checkpoint)
    else:
        model, processor = build_model(recipe, state, log)
    return model, processor, list(model.config.trained_tasks or [])



def make_validator(recipe: dict, processor, val_split, baselines):
    """A function model -> quick validation scores (grammar-constrained grounding, caption exact match)."""
    from ..eval.run import evaluate_synthetic

    settings = recipe["eval"]

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        scores = evaluate_synthetic(model, processor, val_split, limit=settings["val_regions"],
                                    batch_size=settings["batch_size"], baseline_box=baselines[0],
                                    baseline_caption=baselines[1], unconstrained=False, progress=False)
        model.train(was_training)
        return {k: scores[k] for k in ("grounding_acc50", "grounding_miou", "caption_exact")}

    return evaluate


def make_prober(recipe: dict, processor, folder: Path, train):
    """With ``eval.probe_images``: a function model -> the region probe (eval/probe.py) of its ViT, fit on the
    regions of that many training images and scored on the test split's: how much of *what is where* the patch
    features carry, the quantity stage 1 is meant to raise. None without the setting, a test split, or with
    streaming data."""
    images = recipe["eval"]["probe_images"]
    test_split = recipe["data"]["splits"]["test"]
    if not images or not has_split(folder, test_split) or recipe["data"]["streaming"]:
        return None
    from ..eval.probe import linear_probe

    fit, test = train.select(range(min(int(images), len(train)))), load_split(folder, test_split)
    size = phase_training(recipe, next(iter(recipe["phases"]))).get("roi_output_size", 2)

    def probe(model) -> dict:
        scores = linear_probe(model, processor, fit, test, output_size=size, seed=recipe["seed"])
        return {k: v for k, v in scores.items() if k in ("probe_shape_acc", "probe_colour_acc")}

    return probe


def run(recipe: dict, only: list[str] | None = None, log=print, start_from: tuple | None = None) -> tuple:
    """Run the recipe's phases (all, or the names in `only`); returns (model, processor, RunState, data folder).

    With `only`, each phase saves `{output_dir}/<phase>/final` and the first one starts from the saved `final` of
    the last earlier phase (or from the build when there is none). `start_from`: a (model, processor) to train instead of
    building one (the experiments probe the built model before training it).
    """
    from ..eval.run import synthetic_baselines
    from .build import save_granvit
    from .trainers import GranViTTrainingArguments

    state = RunState()
    if recipe["threads"]:
        torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    names = list(recipe["phases"]) if only is None else only
    start = time.time()
    log(f"  training on {describe(recipe)}")

    # Under a distributed launch the first process writes the data and the build, the others then read them.
    first = GranViTTrainingArguments(output_dir=str(Path(recipe["output_dir"]) / BUILD_DIR),
                                     **{k: v for k, v in recipe["training"].items() if k != "resume_from_checkpoint"})
    with first.main_process_first(desc="data, parts and build", local=False):
        folder = prepare_data(recipe, log)
        state.timings["data_s"] = time.time() - start
        built = Path(recipe["output_dir"]) / BUILD_DIR
        if start_from is None and not first.should_save and (built / "config.json").exists():
            start_from = load_checkpoint(built)
        model, processor, state.trained_tasks = _starting_model(recipe, names, only, start_from, state, log)
        state.timings["parts_and_build_s"] = time.time() - start - state.timings["data_s"]
    split_names, streaming = recipe["data"]["splits"], recipe["data"]["streaming"]
    train = load_split(folder, split_names["train"], streaming)
    limit = recipe["data"]["train_images"]
    if limit:  # the first N images (a smaller training set is a prefix of the larger one)
        train = train.take(limit) if streaming else train.select(range(min(int(limit), len(train))))
    noise = AnnotationNoise.from_recipe(recipe["data"]["annotation_noise"])  # map-style only: checked at load
    if noise is not None:
        train, state.annotation_noise = add_annotation_noise(train, noise)
        log(f"  annotation noise on the training regions: {state.annotation_noise}")
    val = load_split(folder, split_names["val"]) if has_split(folder, split_names["val"]) else None

    evaluate = None
    if val is not None and recipe["eval"]["every"] is not None and is_main_process():
        baseline_rows = train if not streaming else load_split(folder, split_names["train"]).take(10000)
        evaluate = make_validator(recipe, processor, val, synthetic_baselines(baseline_rows))
        if names:
            state.curve["val"].append({**evaluate(model), "step": 0, "phase": "start"})
            state.phase_scores["start"] = {k: v for k, v in state.curve["val"][-1].items() if k not in ("step", "phase")}
    probe = make_prober(recipe, processor, folder, train) if is_main_process() else None
    if probe is not None and names:
        state.phase_scores.setdefault("start", {}).update(probe(model))

    for name in names:
        if name not in recipe["phases"]:
            raise UserError(f"no phase {name!r} in the recipe; phases: {list(recipe['phases'])}")
        model, trainer = run_phase(recipe, name, model, processor, train, state, evaluate, log)
        state.last_trainer = trainer
        if probe is not None and "vision_tower" in TRAINED[recipe["phases"][name]["stage"]]:
            state.phase_scores.setdefault(name, {}).update(probe(model))
        model.config.trained_tasks = list(state.trained_tasks)
        if only is not None and trainer.is_world_process_zero():
            final = phase_dir(recipe, name) / "final"
            save_granvit(model, processor, final)
            if getattr(trainer, "teacher", None) is not None:
                from .ema import save_teacher

                save_teacher(trainer.teacher, str(phase_dir(recipe, name)))
            log(f"  [{name}] saved {final}")
    state.timings["train_total_s"] = time.time() - start
    return model, processor, state, folder
