"""Training on every core a command is given: data-parallel worker processes (torch.distributed, gloo on the CPU).

A recipe's ``processes`` says how many: ``auto`` (the default) is one process per core this process may run on
(``os.sched_getaffinity``) when it trains on the CPU, and one process on a GPU machine (launch many GPUs with
``accelerate launch``, train/cli.py); a number forces it (``processes: 1``, or ``--set processes=1``). Each worker runs
the same command with ``torch.distributed.run`` and one torch thread; the batch of the recipe stays the global batch
(each of N workers takes ``per_device_train_batch_size / N`` images), so N processes train what one process would,
within float noise. Why processes and not threads: BENCHMARKS.md, "Both cores".
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from ..console import UserError

SPLIT_ENV = "GRANVIT_SPLIT_BATCH"  # set for the workers of a launch made here: the recipe's batch is the global one
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_worker() -> bool:
    """True inside a distributed launch (torchrun, accelerate launch): never relaunch from there."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that evaluates, logs and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def on_cpu(recipe: dict) -> bool:
    import torch

    return bool(recipe["training"].get("use_cpu")) or not torch.cuda.is_available()


def planned_processes(recipe: dict) -> int:
    """How many data-parallel processes the recipe asks for on this machine."""
    value = recipe["processes"]  # 'auto' or a positive number (train/recipe.py checks)
    return (available_cores() if on_cpu(recipe) else 1) if value == "auto" else value


def check_batches(recipe: dict, processes: int) -> None:
    """Every phase's batch must split evenly over the workers (one line naming the phase otherwise)."""
    from .recipe import phase_setting

    for name in recipe["phases"]:
        batch = phase_setting(recipe, name, "per_device_train_batch_size")
        if batch % processes:
            raise UserError(f"phases.{name}: per_device_train_batch_size {batch} does not split over {processes} "
                            f"processes; set processes=1 or a batch that is a multiple of {processes}")


def split_batch(batch: int) -> int:
    """A worker's share of the recipe's batch (the whole batch outside a launch made here)."""
    return batch // int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get(SPLIT_ENV) else batch


def relaunch(module: str, argv: list[str], recipe: dict, processes: int) -> int:
    """Run ``python -m module argv`` as `processes` workers (``torch.distributed.run``, one thread each, the batch
    split between them); returns their exit code. Parts the recipe trains for itself are made before, by the caller
    (runner.own_parts_first): the workers then find them cached."""
    check_batches(recipe, processes)
    print(f"training on {processes} processes x 1 thread, data parallel over gloo (the recipe's batch split between "
          "them; processes=1 for one process)", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, *argv]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": "1", SPLIT_ENV: "1"},
                           preexec_fn=die_with_parent)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (elsewhere: nothing). torch.distributed.run starts each
    worker in a session of its own, so without this a SIGKILL of the launch, even of its whole session, leaves the
    workers training on and writing into the output folder, where a resumed run would then meet them. Called by
    the launch for torch.distributed.run (before it starts) and by every worker (train/cli.py, train/quickstart.py)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def describe(recipe: dict) -> str:
    """One log line: how this process trains."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = "CPU" if on_cpu(recipe) else "GPU"
    return (f"{world} process{'es' if world > 1 else ''} x {torch.get_num_threads()} thread"
            f"{'s' if torch.get_num_threads() > 1 else ''} ({where}{', data parallel over gloo' if world > 1 and where == 'CPU' else ''})")
