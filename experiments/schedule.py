"""An experiment's independent runs over the machine's cores: one run per core, each in a process of its own.

    python -m granvit.experiments.ablations --claim stages distill data --seeds 0 1 2    # any experiment: --jobs N
    python -m granvit.experiments.schedule --measure                                   # why one run per core (RESULT)

Every experiment (transfer.py, ablations.py, grpo.py, tiling.py) lists its runs as `Job`s in seed-major order and hands
them to `run_jobs`, which runs `--jobs` of them at a time (default: one per core, `os.sched_getaffinity`, over the
torch threads each run takes). A job returns its run's JSON; the JSON is written when the run ends, so a run either
exists whole or not at all, and an existing JSON is skipped on the next call (unless --force).

    --jobs 1   the runs one after another in this process, their output on the terminal (as before this file; no
               worker start-up, which costs a few seconds of CPU for the imports: nothing beside a run of minutes)
    --jobs N   N spawned worker processes, a fresh one per run (nothing carries over from one run to the next), with
               OMP_NUM_THREADS and torch threads = --threads; a run's output goes to <its JSON>.log beside it and this
               process prints one line when a run starts and one when it ends, with its wall time
A run that raises keeps its traceback in <its JSON>.traceback.txt and the others go on; a job that reads an earlier
job's JSON (`after`: a grpo run's wall time, which its stage-2 arm matches) starts once that JSON is written, and is
reported as not run if that job failed. Shared data folders are written by the experiment before `run_jobs`.

Why one run per core and not each run on both cores (the runner's data parallelism, train/launch.py): runs of one
experiment share nothing, so side by side they need no gradient exchange between processes, and the scoring and probes
that follow each run's training are single-process work that data parallelism would run on one core while the other
idles. `--measure` times both ways on the main job's stage 2 (one run per core, two on 2 cores, each `--steps` steps
from one build, each a whole `granvit-train` command): side by side, one process x one thread each, against one after
the other, each on `processes` = the cores (data parallel, gloo); it prints RESULT lines. Run it on a quiet machine
(load average < 1) with the shipped parts (the smoke stand-in parts time start-up, not training).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from ..train.launch import available_cores


@dataclass(frozen=True)
class Job:
    """One run: `fn(*args)` returns its JSON (a dict), written to `path`. `fn` is a module-level function and `args`
    picklable values: a spawned worker imports the function by name and unpickles the arguments."""

    name: str  # what the progress lines call it, e.g. "stages/staged seed 0"
    path: Path
    fn: Callable
    args: tuple = ()
    after: tuple[Path, ...] = ()  # JSONs of earlier jobs that fn reads: it starts once they are written


def log_path(job: Job) -> Path:
    return job.path.with_suffix(".log")


def traceback_path(job: Job) -> Path:
    return job.path.with_suffix(".traceback.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--jobs and --threads, the same in every experiment."""
    parser.add_argument("--jobs", type=positive, help="runs at a time, each in its own process (default: one per "
                        "core over --threads: every core busy)")
    parser.add_argument("--threads", type=positive, default=1, help="torch threads per run")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


# ============================================================================================ one run
def write_json(path: Path, value) -> None:
    """Through a sibling temporary file: a JSON on disk is always whole (a killed run leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def execute(job: Job, threads: int) -> bool:
    """Run one job here and write its JSON; False (its traceback saved and printed) when it raised."""
    import torch

    torch.set_num_threads(threads)
    try:
        result = job.fn(*job.args)
    except (Exception, SystemExit):  # a failed run is reported, the others go on; Ctrl-C still stops everything
        text = traceback.format_exc()
        job.path.parent.mkdir(parents=True, exist_ok=True)
        traceback_path(job).write_text(text)
        print(text, file=sys.stderr, flush=True)
        return False
    write_json(job.path, result)
    return True


def _worker(job: Job, threads: int) -> None:
    """A spawned process's whole life: its output (Python's and the libraries' own) to the run's log, then the run."""
    with open(log_path(job), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.exit(0 if execute(job, threads) else 1)


def _spawn(context, job: Job, threads: int):
    """A worker for `job`; OMP_NUM_THREADS is set while it starts, as the worker's libraries read it at import."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        process = context.Process(target=_worker, args=(job, threads), name=job.name)
        process.start()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return process


# ============================================================================================ many runs
def run_jobs(jobs: list[Job], workers: int | None = None, threads: int = 1, force: bool = False,
             line: Callable[[dict], str] | None = None) -> list[Job]:
    """Run every job whose JSON is missing (all of them with `force`), `workers` at a time (None: one per core over
    `threads`), in list order as far as `after` allows; returns the jobs that failed or could not run. `line(result)`:
    the figures printed when a run ends. Spawned workers rather than a ProcessPoolExecutor: a worker killed from outside (out of memory) would break
    the executor and fail every run still queued; here it fails that run only."""
    todo = []
    for job in jobs:
        if job.path.exists() and not force:
            print(f"skip {job.name}: {job.path} exists (--force reruns it)", flush=True)
        else:
            todo.append(job)
    workers = workers or max(1, available_cores() // threads)
    total, failed, running = len(todo), [], {}  # running: sentinel -> (job, process, start time)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state forked from this one

    def finished(job: Job, ok: bool, start: float, why: str = "") -> None:
        seconds = time.time() - start
        if ok:
            figures = f": {line(json.loads(job.path.read_text()))}" if line else ""
            print(f"done {job.name} in {seconds:.0f} s{figures}", flush=True)
        else:
            failed.append(job)
            where = f"; traceback: {traceback_path(job)}" if traceback_path(job).exists() else ""
            print(f"FAILED {job.name} after {seconds:.0f} s{why}{where}", flush=True)

    def ready(job: Job) -> bool | None:
        """True to start now, False to wait for an `after` job still to run, None if one of those failed."""
        if any(earlier.path in job.after for earlier in failed):
            return None
        pending = {j.path for j in todo} | {j.path for j, _, _ in running.values()}
        return not any(needed in pending for needed in job.after)

    try:
        while todo or running:
            waiting = len(todo)
            for job in list(todo):
                if len(running) >= workers:
                    break
                state = ready(job)
                if state is False:
                    continue
                todo.remove(job)
                traceback_path(job).unlink(missing_ok=True)  # a previous call's, never to be read as this one's
                if state is None:
                    finished(job, False, time.time(), f" (not run: it needs {', '.join(map(str, job.after))})")
                    continue
                print(f"[{total - len(todo)}/{total}] start {job.name}"
                      + (f" (log: {log_path(job)})" if workers > 1 else ""), flush=True)
                if workers == 1:
                    start = time.time()
                    finished(job, execute(job, threads), start)
                else:
                    job.path.parent.mkdir(parents=True, exist_ok=True)
                    process = _spawn(context, job, threads)
                    running[process.sentinel] = (job, process, time.time())
            if not running and len(todo) == waiting:
                raise ValueError(f"these jobs wait for each other's JSON: {', '.join(j.name for j in todo)}")
            for sentinel in wait(list(running)) if running else []:
                job, process, start = running.pop(sentinel)
                process.join()
                code = process.exitcode
                finished(job, code == 0, start, "" if code in (0, 1) else f" (worker ended with code {code})")
    finally:  # Ctrl-C or a bug here: no worker outlives this process
        for _, process, _ in running.values():
            process.terminate()
            process.join()
    print(f"{total - len(failed)} run(s) done, {len(jobs) - total} skipped, {len(failed)} failed"
          + (f": {', '.join(j.name for j in failed)}" if failed else ""), flush=True)
    return failed


def check(failed: list[Job]) -> None:
    """End an experiment's command with exit code 1 and one line when runs failed (after its summary is written)."""
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(j.name for j in failed)}; their tracebacks: "
                         + ", ".join(str(traceback_path(j)) for j in failed if traceback_path(j).exists()))


# ============================================================================================ --measure
def measure(steps: int, work: Path) -> dict:
    """Wall time of two stage-2 runs of the main job's recipe side by side (1 process x 1 thread each) and one after
    the other on every core (data parallel, one thread per process); each run is a whole `granvit-train` command."""
    from ..train.recipe import CONFIGS, load_recipe
    from ..train.runner import RunState, build_model, prepare_data

    cores = available_cores()
    if cores < 2:
        raise SystemExit(f"--measure compares ways of using 2+ cores; this process may run on {cores}")
    config = CONFIGS / "quickstart.yaml"
    recipe = load_recipe(config, [f"output_dir={work}"])
    data = prepare_data(recipe, log=print)
    build_model(recipe, RunState(), log=print)

    def command(name: str, seed: int, processes: int) -> list[str]:
        return [sys.executable, "-m", "granvit.train.cli", "--phase", "stage2", "--config", str(config),
                f"output_dir={work / name}", f"model.checkpoint={work / 'build'}", f"data.path={data}", "eval={}",
                f"seed={seed}", f"phases.stage2.training.max_steps={steps}", f"processes={processes}", "threads=1",
                "training.disable_tqdm=true"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = open(work / "measure.log", "w")
    seconds = {}
    start = time.time()
    side = [subprocess.Popen(command(f"side{seed}", seed, 1), env=env, stdout=logs, stderr=subprocess.STDOUT)
            for seed in range(cores)]
    if any(p.wait() for p in side):
        raise SystemExit(f"a side-by-side run failed: {work / 'measure.log'}")
    seconds["side_by_side"] = time.time() - start
    start = time.time()
    for seed in range(cores):
        subprocess.run(command(f"parallel{seed}", seed, cores), env=env, stdout=logs, stderr=subprocess.STDOUT, check=True)
    seconds["data_parallel"] = time.time() - start
    logs.close()
    return {"cores": cores, "runs": cores, "steps": steps, **seconds, "load_average": os.getloadavg()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="time side by side vs data parallel (RESULT lines)")
    parser.add_argument("--steps", type=positive, default=60, help="stage-2 steps of each measured run")
    parser.add_argument("--work", help="folder for the measurement's data, build and logs (default: a new temp folder)")
    args = parser.parse_args(argv)
    if not args.measure:
        parser.error("nothing to do: the experiments call run_jobs themselves; --measure times the two ways")
    print(f"load average before: {os.getloadavg()} (a quiet machine reads < 1)", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="granvit-schedule-"))
    work.mkdir(parents=True, exist_ok=True)
    result = measure(args.steps, work)
    print(json.dumps(result))
    print(f"RESULT experiments_side_by_side_s {result['side_by_side']:.1f}")
    print(f"RESULT experiments_data_parallel_s {result['data_parallel']:.1f}")
    print(f"RESULT experiments_side_by_side_speedup {result['data_parallel'] / result['side_by_side']:.3f}")
    print(f"RESULT experiments_faster {min(('side_by_side', 'data_parallel'), key=result.get)}")


if __name__ == "__main__":
    main()
