"""`granvit-train`: run one GranViT training stage from a YAML config (+ `key=value` overrides).

    # one CPU (smoke test: synthetic set and a tiny model built in-process, ~1 min)
    granvit-train --stage 1 --config train/configs/cli_tiny_cpu.yaml
    granvit-train --stage 2 --config train/configs/cli_tiny_cpu.yaml      # starts from {output_dir}/stage1/final

    # one GPU (the paper recipe: SigLIP 2 base-512 + Qwen2.5-1.5B; build the checkpoint once with granvit-build)
    granvit-build --vision google/siglip2-base-patch16-512 --llm Qwen/Qwen2.5-1.5B --out granvit-base
    granvit-train --stage 1 --config train/configs/paper_siglip2_qwen2.5_1.5b.yaml \
        model.checkpoint=granvit-base data.path=/data/gran29m training.gradient_accumulation_steps=32

    # many GPUs, one node (8 GPUs; per-device batch 8 x 4 accumulation x 8 GPUs = 256)
    accelerate launch --config_file train/configs/accelerate/ddp.yaml -m granvit.train.cli \
        --stage 1 --config train/configs/paper_siglip2_qwen2.5_1.5b.yaml model.checkpoint=granvit-base data.path=/data/gran29m
    # ZeRO-2 / FSDP: --config_file train/configs/accelerate/deepspeed_zero2.yaml (or fsdp.yaml); ZeRO-3: stage 2 only
    # 2 CPU processes (testing the distributed path): torchrun --standalone --nproc_per_node 2 -m granvit.train.cli ...

Config layout (see the YAML files): `output_dir`; `model` (`checkpoint`, or `tiny` = keyword arguments of
`train.tiny.save_tiny_parts` to build one); `data` (`path` = a Gran dataset folder, or `synthetic` = split sizes
generated in-process with `synth` = `SynthConfig` fields; `regions_per_image`, `bbox2caption_ratio`); `training` =
`GranViTTrainingArguments` fields; `stage1` / `stage2` / `sft` = the same sections, merged over the top level for that
stage. Overrides are dotted paths with YAML values: `training.max_steps=10`, `stage2.training.lora_r=8`.
"""

import argparse
import copy
import hashlib
import logging
import os
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)
STAGES = ("1", "2", "sft")
SECTIONS = ("model", "data", "training")


# ============================================================================================ config
def load_config(path: str, stage: str, overrides: list[str] = ()) -> dict:
    """YAML -> {output_dir, model, data, training} for one stage: overrides, then the stage section merged on top."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    late = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key.split(".")[0] in SECTIONS:
            late.append((key, value))  # applied after the stage merge, so they beat the stage section
        _set(raw, key, yaml.safe_load(value))
    stage_key = "sft" if stage == "sft" else f"stage{stage}"
    config = _merge({k: v for k, v in raw.items() if k not in ("stage1", "stage2", "sft")}, raw.get(stage_key) or {})
    for key, value in late:
        _set(config, key, yaml.safe_load(value))
    unknown = set(config) - {"output_dir", *SECTIONS}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: output_dir, {', '.join(SECTIONS)}, stage1, stage2, sft")
    config.setdefault("output_dir", "runs/granvit")
    for section in SECTIONS:
        config[section] = config.get(section) or {}
    return _format(config, output_dir=config["output_dir"])


def _set(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config.setdefault(p, {})
    config[leaf] = value


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _format(value, **names):
    """Fill `{output_dir}` in string values (e.g. stage 2's `model.checkpoint: "{output_dir}/stage1/final"`)."""
    if isinstance(value, dict):
        return {k: _format(v, **names) for k, v in value.items()}
    return value.format(**names) if isinstance(value, str) and "{" in value else value


# ============================================================================================ model
def load_model(model_cfg: dict, data_cfg: dict, output_dir: str, args):
    """(model, processor) from `model.checkpoint`, or a tiny checkpoint built from `model.tiny` (once, on rank 0)."""
    from ..modeling_granvit import GranViTForConditionalGeneration
    from ..processing_granvit import GranViTProcessor

    checkpoint = model_cfg.get("checkpoint")
    if not checkpoint:
        if "tiny" not in model_cfg:
            raise ValueError("set model.checkpoint (a granvit-build folder) or model.tiny (build a tiny model here)")
        checkpoint = os.path.join(output_dir, "tiny-build", "granvit")
        with args.main_process_first(desc="build the tiny model"):
            if not os.path.isdir(checkpoint):
                from .tiny import build_tiny_checkpoint

                tiny = dict(model_cfg["tiny"])
                bins = tiny.pop("num_coord_bins", 100)
                texts = [r["caption"] for rec in synthetic_records(data_cfg, "train") for r in rec["regions"]] or None
                build_tiny_checkpoint(Path(checkpoint).parent, num_coord_bins=bins, box_format=tiny.pop("box_format", "tokens"), **tiny, **({"texts": texts} if texts else {}))
    model = GranViTForConditionalGeneration.from_pretrained(checkpoint)
    return model, GranViTProcessor.from_pretrained(checkpoint)


# ============================================================================================ data
def synthetic_records(data_cfg: dict, split: str) -> list[dict]:
    from .data.synth import SynthConfig, generate_record

    n = (data_cfg.get("synthetic") or {}).get(split, 0)
    cfg = SynthConfig(**(data_cfg.get("synth") or {}))
    return [generate_record(cfg, data_cfg.get("seed", 0), split, i) for i in range(n)]


def keep_fraction(example: dict, fraction: float, seed: int) -> bool:
    """A seeded coin per example (stable across runs, ranks and resumes)."""
    digest = hashlib.sha256(f"{seed}:{example['image_id']}:{example['prompt']}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def vqa_examples(records, processor):
    """SFT examples from rows with `image` + `question` + `answer`, or, for synthetic Gran records, a counting question."""
    from .data.schema import decode_image

    for row in records:
        image = decode_image(row["image"]).convert("RGB") if not hasattr(row["image"], "convert") else row["image"].convert("RGB")
        question = row.get("question") or "How many objects are in the image?"
        answer = row.get("answer") or str(len(row["regions"]))
        yield {"image": image, "image_id": row.get("image_id", ""), "task": "vqa", "prompt": processor.vqa_prompt(question),
               "target": processor.plain_text(answer), "skipped": {}}


def build_dataset(stage: str, data_cfg: dict, processor, args):
    """Training examples for a stage: a list (synthetic) or an `IterableDataset` split by rank (a Gran folder)."""
    from .data.tasks import TaskBuilder

    seed = data_cfg.get("seed", 0)
    tasks = ("bbox2caption",) if stage == "1" else ("caption2bbox", "bbox2caption")
    ratio = data_cfg.get("bbox2caption_ratio", 0.0 if stage == "1" else 0.25)
    builder = TaskBuilder(processor, tasks=tasks, regions_per_image=data_cfg.get("regions_per_image", 4), stage1=stage == "1", seed=seed)

    def mix(example):  # stage 2: every Caption2Bbox example, and Bbox2Caption ones with probability `ratio`
        return stage == "1" or example["task"] == "caption2bbox" or keep_fraction(example, ratio, seed)

    if data_cfg.get("path"):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        ds = load_dataset(data_cfg["path"], split=data_cfg.get("split", "train"), streaming=True)
        if args.world_size > 1:  # whole shards per rank; `dispatch_batches: false` in the args (see below)
            ds = split_dataset_by_node(ds, rank=args.process_index, world_size=args.world_size)
        if stage == "sft":
            from datasets import IterableDataset

            return IterableDataset.from_generator(vqa_examples, gen_kwargs={"records": ds, "processor": processor})
        return builder.apply(ds).filter(mix)
    records = synthetic_records(data_cfg, "train")
    if not records:
        raise ValueError("set data.path (a Gran dataset folder) or data.synthetic.train (number of images)")
    if stage == "sft":
        return list(vqa_examples(records, processor))
    return [e for e in builder.iter_examples(records) if mix(e)]


def last_complete_checkpoint(stage_dir: str, stage: str) -> str | None:
    """The newest checkpoint that was fully written. The Trainer writes checkpoint folders in place, so a crash while
    saving leaves a partial `checkpoint-N` that `resume_from_checkpoint=True` would pick. `trainer_state.json` is the
    Trainer's last file, and stage 1 writes `ema_teacher.safetensors` after it."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from .ema import TEACHER_FILE

    required = ["trainer_state.json"] + ([TEACHER_FILE] if stage == "1" else [])
    candidates = sorted(Path(stage_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for checkpoint in reversed(candidates):
        if all((checkpoint / name).is_file() for name in required):
            return str(checkpoint)
        logger.warning("Skipping %s: incomplete (killed while saving?)", checkpoint)
    logger.warning("No complete checkpoint in %s: starting from scratch", stage_dir)
    return None


# ============================================================================================ main
def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML file (train/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. training.max_steps=10")
    cli = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(load_config(cli.config, cli.stage, cli.overrides), cli.stage)


def run(config: dict, stage: str):
    """Train one stage; returns the trainer. Writes `{output_dir}/stage{N}/checkpoint-*` and `.../final`."""
    from .build import save_granvit
    from .data.tasks import SkipCounter, TaskCollator, skip_counter_callback
    from .ema import save_teacher
    from .trainers import TRAINERS, GranViTTrainingArguments

    stage_dir = os.path.join(config["output_dir"], "sft" if stage == "sft" else f"stage{stage}")
    training = {"output_dir": stage_dir, **config["training"]}
    if config["data"].get("path"):
        # Each rank reads its own shards (split_dataset_by_node); the default would read on rank 0 and dispatch.
        training.setdefault("accelerator_config", {"dispatch_batches": False})
    args = GranViTTrainingArguments(**training)
    model, processor = load_model(config["model"], config["data"], config["output_dir"], args)
    dataset = build_dataset(stage, config["data"], processor, args)
    counter = SkipCounter()
    trainer = TRAINERS[stage](
        model=model, args=args, train_dataset=dataset, data_collator=TaskCollator(processor, counter),
        processing_class=processor, callbacks=[skip_counter_callback(counter)],
    )
    resume = args.resume_from_checkpoint
    if str(resume).lower() in ("true", "last"):
        resume = last_complete_checkpoint(stage_dir, stage)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        final = os.path.join(stage_dir, "final")
        trained = trainer.model
        if hasattr(trained, "merge_and_unload"):  # LoRA: keep the adapter, ship the merged model
            trained.save_pretrained(os.path.join(stage_dir, "adapter"))
            trained = trained.merge_and_unload()
        save_granvit(trained, processor, final)
        if trainer.teacher is not None:
            save_teacher(trainer.teacher, stage_dir)
        logger.info("Stage %s done: model in %s", stage, final)
    return trainer


if __name__ == "__main__":
    main()
