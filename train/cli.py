"""`granvit-train`: run the phases of one stage of a training recipe (train/recipe.py), one stage per process.

    # one CPU: the main job's recipe, stage by stage (the same runner granvit-quickstart uses)
    granvit-train --stage 1 --config train/configs/quickstart.yaml
    granvit-train --stage 2 --config train/configs/quickstart.yaml          # starts from {output_dir}/stage1/final
    granvit-eval --model outputs/quickstart/stage2/final --benchmark gran --data outputs/quickstart/data --split test

    # a one-minute smoke run of both stages on tiny parts
    granvit-train --stage 1 --config train/configs/cli_tiny_cpu.yaml && granvit-train --stage 2 --config train/configs/cli_tiny_cpu.yaml

    # the trl stages (train/trl_stages.py): SFT on conversations, grounding refined by RL with an IoU reward
    granvit-train --stage sft --config train/configs/sft_quickstart.yaml
    granvit-train --stage grpo --config train/configs/grpo_quickstart.yaml

    # one GPU, the paper recipe (SigLIP 2 base-512 + Qwen2.5-1.5B; the build happens once, in stage 1)
    granvit-train --stage 1 --config train/configs/paper_siglip2_qwen2.5_1.5b.yaml data.path=/data/gran29m \
        training.gradient_accumulation_steps=32

    # many GPUs, one node (8 GPUs; 2 images x 4 queries per device x 4 accumulation x 8 GPUs = 256 queries per step)
    accelerate launch --config_file train/configs/accelerate/ddp.yaml -m granvit.train.cli \
        --stage 1 --config train/configs/paper_siglip2_qwen2.5_1.5b.yaml data.path=/data/gran29m
    # ZeRO-2 / FSDP: --config_file train/configs/accelerate/deepspeed_zero2.yaml (or fsdp.yaml); ZeRO-3: stage 2 only

Each phase writes `{output_dir}/<phase>/checkpoint-*` (resume with `phases.<phase>.training.resume_from_checkpoint=true`,
which picks the last complete checkpoint) and `{output_dir}/<phase>/final` (+ `ema_teacher.safetensors` after stage 1).
Overrides are dotted paths with YAML values: `phases.stage1.training.max_steps=10`, `model.box_format=tokens`.
"""

import argparse
import logging
import sys

from ..console import UserError, console_main
from .launch import die_with_parent, is_worker, planned_processes, relaunch
from .recipe import load_recipe
from .runner import own_parts_first, run


def phases_to_run(recipe: dict, stage: str | None, phase: str | None) -> list[str]:
    if phase:
        if phase not in recipe["phases"]:
            raise UserError(f"no phase {phase!r} in the recipe; phases: {list(recipe['phases'])}")
        return [phase]
    names = [name for name, spec in recipe["phases"].items() if spec["stage"] == stage]
    if not names:
        stages = sorted({spec["stage"] for spec in recipe["phases"].values()})
        raise UserError(f"the recipe has no phase of stage {stage!r}; its stages: {stages}")
    return names


@console_main
def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", help="run the recipe's phases of this stage (1, 2, sft, grpo, projector, joint)")
    which.add_argument("--phase", help="run one phase of the recipe by name")
    parser.add_argument("--config", required=True, help="recipe YAML (train/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. phases.stage1.training.max_steps=10")
    cli = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(cli.config, cli.overrides)
    only = phases_to_run(recipe, cli.stage, cli.phase)
    these = {**recipe, "phases": {name: recipe["phases"][name] for name in only}}
    processes = planned_processes(these)
    if processes > 1 and not is_worker():  # one worker per core; each runs this same command
        own_parts_first(these)
        return relaunch("granvit.train.cli", list(argv if argv is not None else sys.argv[1:]), these, processes)
    if is_worker():
        die_with_parent()
    run(recipe, only=only)


if __name__ == "__main__":
    raise SystemExit(main())
