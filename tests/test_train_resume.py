"""Resume identity: a stage-1 run killed with SIGKILL (and a DeepSpeed ZeRO-2 run) resumed from a checkpoint ends with
the same student AND EMA teacher as a run that never stopped."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "cli_tiny_cpu.yaml"
STEPS, SAVE_EVERY, KILL_AFTER = 30, 5, 10


def command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "granvit.train.cli", "--stage", "1", "--config", str(CONFIG), f"output_dir={out}",
        f"training.max_steps={STEPS}", f"training.save_steps={SAVE_EVERY}", "training.save_total_limit=null",
        "training.logging_steps=1", "training.disable_tqdm=true", "training.full_determinism=true", *extra,
    ]


def env() -> dict:
    # One thread: CPU kernels then reduce in a fixed order, so two runs are bitwise comparable.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def final_weights(out: Path) -> tuple[dict, dict]:
    stage = out / "stage1"
    return load_file(stage / "final" / "model.safetensors"), load_file(stage / "ema_teacher.safetensors")


def assert_same_final_weights(a: Path, b: Path) -> tuple[dict, dict]:
    """Student and EMA teacher of run `a` bitwise equal to run `b`'s; returns run `a`'s (student, teacher)."""
    (student_a, teacher_a), (student_b, teacher_b) = final_weights(a), final_weights(b)
    assert set(student_a) == set(student_b) and set(teacher_a) == set(teacher_b)
    for name in student_a:
        assert torch.equal(student_a[name], student_b[name]), f"student {name} differs after resume"
    for name in teacher_a:  # a teacher rebuilt from the starting weights instead of restored would differ here
        assert torch.equal(teacher_a[name], teacher_b[name]), f"teacher {name} differs after resume"
    return student_a, teacher_a


def kill_after_checkpoint(cmd: list, out, whole_session: bool = False) -> None:
    """Start `cmd`, SIGKILL it once stage 1's checkpoint-KILL_AFTER is complete (its EMA teacher is the last file
    written), and check that it died before finishing. `whole_session`: the command runs in its own session and the
    whole session is killed (a launcher, torchrun and its workers die together, as a killed job would)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=whole_session)
    marker = out / "stage1" / f"checkpoint-{KILL_AFTER}" / "ema_teacher.safetensors"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    (os.killpg if whole_session else os.kill)(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    written = sorted((out / "stage1").iterdir())
    time.sleep(3)  # torch.distributed.run's workers live in sessions of their own: they must die with their launcher
    assert sorted((out / "stage1").iterdir()) == written, "the killed run's workers trained on"
    assert not (out / "stage1" / "final").exists()


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(command(straight), env=env(), check=True, capture_output=True)
    tiny = straight / "build"  # the same starting weights for the killed run
    crashed = tmp_path / "crashed"
    kill_after_checkpoint(command(crashed, f"model.checkpoint={tiny}"), crashed)

    resumed = subprocess.run(
        command(crashed, f"model.checkpoint={tiny}", "training.resume_from_checkpoint=true"),
        env=env(), check=True, capture_output=True, text=True,
    )
    logged_steps = resumed.stdout.count("'loss':")  # logging_steps=1: one line per step actually run
    assert 0 < logged_steps <= STEPS - KILL_AFTER, f"resumed run trained {logged_steps} steps: it did not resume"

    student_a, teacher_a = assert_same_final_weights(straight, crashed)
    # and the teacher really moved away from the student (the comparison is not trivially between equal things)
    assert not torch.equal(teacher_a["embeddings.patch_embedding.weight"],
                           student_a["model.vision_tower.embeddings.patch_embedding.weight"])


@pytest.mark.slow
def test_deepspeed_zero2_resume_restores_the_teacher(tmp_path):
    """The DeepSpeed path skips `Trainer._load_from_checkpoint`: the teacher must still come back from the checkpoint."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install -e '.[dev]' installs it)")
    ds = ["training.deepspeed=" + str(CONFIG.parent / "accelerate" / "ds_zero2.json"), "training.max_steps=10"]

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        # DeepSpeed needs a process group even for one process: torchrun provides it (gloo on CPU).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               *command(out, *ds, *extra)[1:]]
        return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900, check=False)

    straight = tmp_path / "straight"
    run = launch(straight)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (straight / "stage1" / f"checkpoint-{SAVE_EVERY}" / f"global_step{SAVE_EVERY}").is_dir()  # a DeepSpeed checkpoint

    resumed = tmp_path / "resumed"  # holds only the straight run's first checkpoint, as if it had died after it
    shutil.copytree(straight / "stage1" / f"checkpoint-{SAVE_EVERY}", resumed / "stage1" / f"checkpoint-{SAVE_EVERY}")
    run = launch(resumed, f"model.checkpoint={straight / 'build'}", "training.resume_from_checkpoint=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert 0 < run.stdout.count("'loss':") <= 10 - SAVE_EVERY, "the resumed run did not resume"
    assert_same_final_weights(straight, resumed)


@pytest.mark.slow
def test_two_process_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """`processes=2`: granvit-train relaunches itself as two data-parallel workers (train/launch.py); killing the
    whole launch mid-stage and rerunning with resume ends where the uninterrupted two-process run ends."""
    two = ["processes=2", f"training.max_steps={STEPS // 2}"]
    build = tmp_path / "build-run"  # the tiny parts and the starting checkpoint, made once in one process
    subprocess.run(command(build, "training.max_steps=1"), env=env(), check=True, capture_output=True)
    start = f"model.checkpoint={build / 'build'}"
    straight = tmp_path / "straight"
    done = subprocess.run(command(straight, start, *two), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training on 2 processes x 1 thread" in done.stdout

    crashed = tmp_path / "crashed"
    kill_after_checkpoint(command(crashed, start, *two), crashed, whole_session=True)
    resumed = subprocess.run(command(crashed, start, *two, "training.resume_from_checkpoint=true"), env=env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 0 < resumed.stdout.count("'loss':") <= STEPS // 2 - KILL_AFTER, "the resumed run did not resume"
    assert_same_final_weights(straight, crashed)
