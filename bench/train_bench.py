"""Stage-1 training cost on this CPU: distillation overhead, GranViT vs a transformers Llava step, peak memory with the
frozen LLM vs training everything, and throughput / MFU in fp32 and bf16.

    OMP_NUM_THREADS=1 python bench/train_bench.py            # ~3 min on one core; prints RESULT lines

Model: the quickstart-sized tiny GranViT (SigLIP 4 x 192 at 128 px with 32 px patches = 16 image tokens, Qwen2
4 x 256, 32 coordinate bins), built in-process; batch of 16 stage-1 examples (Bbox2Caption + one crop each), eager
attention (on this CPU PyTorch's fused SDPA backward is much slower in bf16, see shared/docs/calibration.md).
A "step" = forward + backward + AdamW step (+ the EMA update when distilling), collation excluded (pre-built batches).
Timings: median CPU time (process_time; one thread) of `--steps` steps after 3 warm-up steps, cases interleaved.
Peak memory: each case in a fresh subprocess; peak RSS (psutil, sampled every ms) during 5 steps minus the RSS just
before them, so
the interpreter, torch and the weights themselves cancel out; what remains is activations, gradients, optimizer state.
MFU: FLOPs per step counted by torch.utils.flop_counter (matmuls/convs, forward + backward) x steps/s, divided by the
peak measured here: the best of a few 2048^3 matmuls in the same dtype and thread count.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from granvit.modeling_granvit import GranViTForConditionalGeneration
from granvit.processing_granvit import GranViTProcessor
from granvit.train.build import build_granvit, save_granvit
from granvit.train.data.synth import PRESETS, SynthConfig, generate_record
from granvit.train.data.tasks import TaskBuilder, TaskCollator
from granvit.train.ema import ema_update
from granvit.train.tiny import save_tiny_parts
from granvit.train.trainers import GranViTTrainingArguments, Stage1Trainer
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration, Trainer

BATCH = 16


def build(out: Path) -> Path:
    if (out / "granvit" / "config.json").exists():
        return out / "granvit"
    records = [generate_record(SynthConfig(**PRESETS["tiny"]), 0, "train", i) for i in range(64)]
    texts = [r["caption"] for rec in records for r in rec["regions"]]
    vision, llm = save_tiny_parts(out / "parts", texts=texts, image_size=128, patch_size=32, vision_hidden=192,
                                  vision_layers=4, text_hidden=256, text_layers=4)
    model, processor = build_granvit(str(vision), str(llm), num_coord_bins=32)
    return save_granvit(model, processor, out / "granvit")


def batch_for(processor) -> dict:
    records = [generate_record(SynthConfig(**PRESETS["tiny"]), 0, "train", i) for i in range(BATCH)]
    examples = list(TaskBuilder(processor, tasks=("bbox2caption",), regions_per_image=1, stage1=True).iter_examples(records))
    return dict(TaskCollator(processor)(examples[:BATCH]))


def load(checkpoint: Path) -> GranViTForConditionalGeneration:
    return GranViTForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager")


class Stage1Step:
    """One Stage1Trainer step: `training_step` (forward, loss, backward) + AdamW + EMA, as `Trainer.train` runs it."""

    def __init__(self, checkpoint: Path, args: GranViTTrainingArguments, all_params: bool = False, **changes):
        # A shallow copy keeps the set-up device state: a new TrainingArguments would reset accelerate's process state
        # under the trainers built before it.
        args = copy.copy(args)
        for key, value in changes.items():
            setattr(args, key, value)
        self.trainer = Stage1Trainer(model=load(checkpoint), args=args, processing_class=GranViTProcessor.from_pretrained(checkpoint))
        if all_params:  # the "train everything" comparison: after the stage-1 checks, unfreeze all
            self.trainer.model.requires_grad_(True)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is bypassed here
        self.trainer.model.train()

    def __call__(self, batch):
        t = self.trainer
        n = (batch["labels"][:, 1:] != -100).sum()
        t.training_step(t.model, dict(batch), n)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.args.distill_lambda:
            ema_update(t.teacher, t.model.model.vision_tower, t.args.ema_decay)


class LlavaStep:
    """The same sub-models and weights as a transformers Llava, the LLM frozen (eval), LM loss, AdamW."""

    def __init__(self, checkpoint: Path, args: GranViTTrainingArguments):
        granvit = load(checkpoint)
        c = granvit.config
        config = LlavaConfig(vision_config=c.vision_config, text_config=c.text_config, image_token_id=c.image_token_id,
                             vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                             image_seq_length=c.num_image_tokens)
        self.model = LlavaForConditionalGeneration(config)
        self.model.model.vision_tower.load_state_dict(granvit.model.vision_tower.state_dict())
        self.model.model.multi_modal_projector.load_state_dict(granvit.model.multi_modal_projector.state_dict())
        self.model.model.language_model.load_state_dict(granvit.model.language_model.state_dict())
        self.model.lm_head.load_state_dict(granvit.lm_head.state_dict())
        self.model.set_attn_implementation("eager")
        self.model.requires_grad_(False)
        for part in (self.model.model.vision_tower, self.model.model.multi_modal_projector):
            part.requires_grad_(True)
        for name, param in self.model.model.vision_tower.named_parameters():
            param.requires_grad_("post_layernorm" not in name)  # unused by the projector input, frozen as in GranViT
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = cls([p for p in self.model.parameters() if p.requires_grad], **kwargs)
        self.model.train()
        self.model.model.language_model.eval()

    def __call__(self, batch):
        keys = ("input_ids", "attention_mask", "pixel_values", "labels")
        self.model(**{k: batch[k] for k in keys}).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def median_cpu_times(cases: dict, batch, steps: int) -> dict[str, float]:
    """Median CPU time (`time.process_time`) of a step per case, the cases interleaved step by step. This 2-core machine
    is shared (load average 5-8 while measuring): wall-clock medians swung the ratios by +-30% between runs, while the
    process's own CPU time (one thread, so CPU time = compute time) does not count the time other processes hold the
    core."""
    times = {name: [] for name in cases}
    order = list(cases)
    for i in range(3 + steps):
        order = order[1:] + order[:1]  # rotate: no case always runs right after the same other one
        for name in order:
            step = cases[name]
            start = time.process_time()
            step(batch)
            if i >= 3:
                times[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))  # CPU time, as for the steps
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def step_flops(step, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def memory_case(checkpoint: Path, case: str) -> None:
    """Subprocess body: print the peak RSS growth (bytes) over 5 steps of `case` ("stage1" or "full")."""
    with tempfile.TemporaryDirectory() as out:
        args = GranViTTrainingArguments(output_dir=out, use_cpu=True, report_to="none", roi_output_size=2, learning_rate=1e-4)
        step = Stage1Step(checkpoint, args, all_params=case == "full")
        batch = batch_for(step.trainer.processing_class)
        process = psutil.Process()
        before, peak, done = process.memory_info().rss, [0], threading.Event()

        def sample():  # every millisecond: the step's own high-water mark, not the loading phase's
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        for _ in range(5):
            step(batch)
        done.set()
        sampler.join()
    print(json.dumps({"case": case, "peak_growth": peak[0] - before}))


def peak_growth(checkpoint: Path, case: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-case", case, "--checkpoint", str(checkpoint)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "granvit-train-bench"))
    parser.add_argument("--memory-case", choices=["stage1", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    torch.set_num_threads(1)  # one thread: CPU time is then compute time, and the matmul peak is one core's
    if cli.memory_case:
        return memory_case(Path(cli.checkpoint), cli.memory_case)

    checkpoint = build(Path(cli.workdir))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as out:
        args = GranViTTrainingArguments(output_dir=out, use_cpu=True, report_to="none", roi_output_size=2, learning_rate=1e-4)
        batch = batch_for(GranViTProcessor.from_pretrained(checkpoint))
        cases = {
            "distill": Stage1Step(checkpoint, args, distill_lambda=1.0),
            "distill_crop64": Stage1Step(checkpoint, args, distill_lambda=1.0, crop_size=64),  # 2 x 2 teacher patches
            "lambda0": Stage1Step(checkpoint, args, distill_lambda=0.0),
            "llava": LlavaStep(checkpoint, args),
        }
        t = median_cpu_times(cases, batch, cli.steps)
        flops = step_flops(cases["distill"], batch)
        del cases
        bf16 = GranViTTrainingArguments(output_dir=out, use_cpu=True, report_to="none", roi_output_size=2, learning_rate=1e-4, bf16=True)
        t["distill_bf16"] = median_cpu_times({"bf16": Stage1Step(checkpoint, bf16)}, batch, cli.steps)["bf16"]
    peak32, peak16 = peak_matmul_flops(torch.float32), peak_matmul_flops(torch.bfloat16)
    mem_stage1, mem_full = peak_growth(checkpoint, "stage1"), peak_growth(checkpoint, "full")

    print(f"threads {threads}, batch {BATCH}, median step CPU time (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items()))
    print(f"FLOPs per stage-1 step (fwd+bwd, counted) {flops / 1e9:.2f} G; measured matmul peak fp32 {peak32 / 1e9:.1f} "
          f"GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s; peak RSS growth stage1 {mem_stage1 / 2**20:.0f} MiB, "
          f"all params {mem_full / 2**20:.0f} MiB")
    print(f"RESULT distill_overhead_ratio {t['distill'] / t['lambda0']:.3f}")
    print(f"RESULT distill_overhead_ratio_crop64 {t['distill_crop64'] / t['lambda0']:.3f}")
    print(f"RESULT stage1_vs_llava_step_ratio {t['lambda0'] / t['llava']:.3f}")  # like for like: caption loss, frozen LLM
    print(f"RESULT stage1_distill_vs_llava_step_ratio {t['distill'] / t['llava']:.3f}")
    print(f"RESULT stage1_peak_mem_ratio_vs_full {mem_stage1 / mem_full:.3f}")
    print(f"RESULT cpu_throughput_fp32_examples_per_s {BATCH / t['distill']:.1f}")
    print(f"RESULT cpu_throughput_bf16_examples_per_s {BATCH / t['distill_bf16']:.1f}")
    print(f"RESULT cpu_mfu_fp32 {flops / t['distill'] / peak32:.4f}")
    print(f"RESULT cpu_mfu_bf16 {flops / t['distill_bf16'] / peak16:.4f}")

if __name__ == "__main__":
    main()
