"""Stage 1 in 2 CPU processes (torchrun, gloo): the same logged loss and teacher on both ranks, one checkpoint, and the
same update as one process (no doubled loss: ecosystem.md section 6)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "cli_tiny_cpu.yaml"
STEPS = 3
SCRIPT = """
import os, sys, torch
from granvit.train.recipe import load_recipe
from granvit.train.runner import run

if __name__ == "__main__":  # the parts, when not cached yet, train in a spawned pool that imports this file again
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    trainer = run(recipe, only=[os.environ.get("PHASE", "stage1")])[2].last_trainer
    teacher = trainer.teacher.state_dict() if trainer.teacher is not None else {}
    state = {"log": trainer.state.log_history, "teacher": teacher, "student": trainer.model.state_dict()}
    torch.save(state, f"{recipe['output_dir']}/rank{trainer.args.process_index}.pt")
"""


def overrides(out: Path) -> list[str]:
    # One image with one region: every rank (DistributedSampler pads by repeating) and the single process see the same
    # example at every step, so a correct 2-rank step equals a 1-process step. SGD: an update proportional to the
    # gradient, so a doubled loss would show (Adam's first step would hide a factor 2).
    return [
        f"output_dir={out}", "data.sizes.train=1", "data.regions_per_image=1", "training.per_device_train_batch_size=1",
        f"training.max_steps={STEPS}", f"training.save_steps={STEPS}", "training.logging_steps=1", "training.optim=sgd",
        "training.learning_rate=0.05", "training.lr_scheduler_type=constant", "training.warmup_steps=0",
        "training.disable_tqdm=true",
    ]


@pytest.mark.slow
def test_two_process_stage1_matches_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(script), str(CONFIG), *overrides(single)], env=env, check=True, capture_output=True)
    tiny = f"model.checkpoint={single}/build"
    multi = tmp_path / "multi"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(CONFIG),
         *overrides(multi), tiny],
        env=env, capture_output=True, text=True, timeout=600, check=False,  # rc checked below, with stderr
    )
    assert run.returncode == 0, run.stderr[-3000:]

    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(multi / f"rank{r}.pt") for r in (0, 1)]
    logs = [[h for h in r["log"] if "loss" in h] for r in ranks]
    assert len(logs[0]) == STEPS
    assert logs[0] == logs[1]  # the Trainer gathers the loss: both ranks log the same numbers
    for h1, h0 in zip(logs[0], (h for h in one["log"] if "loss" in h)):
        for key in ("loss", "caption_loss", "distill_loss"):
            assert h1[key] == pytest.approx(h0[key], rel=1e-4), (key, h1[key], h0[key])  # 2x here = the doubled loss
    for name, t in ranks[0]["teacher"].items():
        assert torch.equal(t, ranks[1]["teacher"][name]), f"teacher {name} differs between ranks"
        torch.testing.assert_close(t, one["teacher"][name], rtol=1e-4, atol=1e-6)
    for name, p in ranks[0]["student"].items():
        torch.testing.assert_close(p, one["student"][name], rtol=1e-4, atol=1e-6)  # same gradient as one process

    checkpoints = sorted(p.name for p in (multi / "stage1").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{STEPS}"]
    assert (multi / "stage1" / checkpoints[0] / "ema_teacher.safetensors").is_file()


@pytest.mark.slow
def test_two_process_gradient_surgery_matches_one_process(tmp_path):
    """`gradient_balance: pcgrad` in stage 2 over two images: one process with both in its batch, or two processes with
    one each; the surgery runs on the tasks' gradients summed over the processes, so both take the same steps."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHASE": "stage2"}
    common = ["data.sizes.train=2", "training.gradient_balance=pcgrad", "phases.stage2.tasks={caption2bbox: 1.0, bbox2caption: 1.0}"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(script), str(CONFIG), *overrides(single), *common,
                    "training.per_device_train_batch_size=2"], env=env, check=True, capture_output=True)
    multi = tmp_path / "multi"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(CONFIG),
         *overrides(multi), *common, f"model.checkpoint={single}/build"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, ranks = torch.load(single / "rank0.pt"), [torch.load(multi / f"rank{r}.pt") for r in (0, 1)]
    logged = [h for h in one["log"] if "loss" in h]
    assert len(logged) == STEPS and all("task_grad_cosine" in h for h in logged)
    for name, p in ranks[0]["student"].items():
        assert torch.equal(p, ranks[1]["student"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(p, one["student"][name], rtol=1e-4, atol=1e-6)
