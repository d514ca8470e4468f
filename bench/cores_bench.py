"""Both cores: training steps/s of the main job's stages for one process x one thread, one process x two threads and
two data-parallel processes x one thread (train/launch.py), in fp32 and bf16 autocast, on a quiet machine and with a
second busy process on it.

    python bench/cores_bench.py                    # ~10 min on 2 cores; needs the shipped parts; prints RESULT lines
    python bench/cores_bench.py --steps 30 --cases 1p1t 2p1t --no-load          # a quicker look

Every case trains the real runner on the main job's recipe (train/configs/quickstart.yaml: its data, build from the
shipped parts, collator and batch of 8 images per step) in a fresh process, for `--steps` steps of one phase; a
callback times steps `--warmup`..end, so start-up, data loading set-up and the first steps do not count. The global
batch is the recipe's in every case (two processes take 4 images each). Load: a second process spinning on a large
matmul loop on one thread, started before the case and stopped after it.
`RESULT train_two_core_speedup`: the best two-core steps/s over one process x one thread (fp32), per stage, then
their mean weighted by the main job's steps of each stage; `RESULT train_two_core_speedup_<case>` the same for each
two-core case alone.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"1p1t": (1, 1), "1p2t": (1, 2), "2p1t": (2, 1)}


# ============================================================================================ worker
def worker(args) -> None:
    import torch
    from granvit.train.recipe import CONFIGS, load_recipe
    from granvit.train.runner import RunState, load_split, make_trainer
    from transformers import TrainerCallback

    recipe = load_recipe(CONFIGS / "quickstart.yaml", [
        f"output_dir={args.work}", f"data.path={args.data}", f"model.checkpoint={args.checkpoint}", "eval={}",
        f"phases.{args.phase}.training.max_steps={args.steps}", "training.save_strategy=no", "training.logging_steps=1000",
        "training.disable_tqdm=true", f"training.bf16={str(args.bf16).lower()}", f"threads={args.threads}",
    ])
    torch.set_num_threads(args.threads)
    from granvit.train.runner import load_checkpoint

    model, processor = load_checkpoint(args.checkpoint)  # the trainer itself trains bf16 in eager attention
    marks = {}

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step in (args.warmup, args.steps):
                marks[state.global_step] = time.perf_counter()

    trainer = make_trainer(recipe, args.phase, model, processor, load_split(Path(args.data), "train"), RunState())
    trainer.add_callback(Timer())
    trainer.train()
    if trainer.is_world_process_zero():
        rate = (args.steps - args.warmup) / (marks[args.steps] - marks[args.warmup])
        Path(args.result).write_text(json.dumps({"steps_per_s": rate, "world": trainer.args.world_size,
                                                 "per_device": trainer.args.per_device_train_batch_size}))


# ============================================================================================ driver
def busy() -> subprocess.Popen:
    code = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run_case(case: str, phase: str, bf16: bool, args, checkpoint: Path, data: Path, loaded: bool) -> float:
    processes, threads = CASES[case]
    with tempfile.TemporaryDirectory() as work:
        result = Path(work) / "result.json"
        command = [__file__, "worker", "--phase", phase, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(threads), "--data", str(data), "--checkpoint", str(checkpoint), "--work", work,
                   "--result", str(result)] + (["--bf16"] if bf16 else [])
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] + command
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GRANVIT_SPLIT_BATCH": "1"}
        load = busy() if loaded else None
        try:
            subprocess.run([sys.executable, *command], env=env, check=True, capture_output=True)
        finally:
            if load is not None:
                load.kill()
        return json.loads(result.read_text())["steps_per_s"]


def prepare(work: Path) -> tuple[Path, Path]:
    """The main job's data and its build from the shipped parts (what granvit-quickstart trains from)."""
    from granvit.train.recipe import CONFIGS, load_recipe
    from granvit.train.runner import RunState, build_model, prepare_data

    recipe = load_recipe(CONFIGS / "quickstart.yaml", [f"output_dir={work}"])
    data = prepare_data(recipe, log=lambda *a: None)
    build_model(recipe, RunState(), log=lambda *a: None)
    return work / "build", data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--phases", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--no-load", action="store_true", help="skip the cases with a second busy process")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--work", default=None)
    # worker only
    parser.add_argument("--phase"), parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data"), parser.add_argument("--checkpoint"), parser.add_argument("--result")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        return worker(args)

    from granvit.train.recipe import CONFIGS, load_recipe

    work = Path(args.work or tempfile.mkdtemp(prefix="granvit-cores-"))
    checkpoint, data = prepare(work)
    recipe = load_recipe(CONFIGS / "quickstart.yaml")
    weights = {p: recipe["phases"][p]["training"]["max_steps"] for p in args.phases}
    rates = {}
    for loaded in ([False] if args.no_load else [False, True]):
        for phase in args.phases:
            for bf16 in ([False] if args.no_bf16 else [False, True]):
                for case in args.cases:
                    key = f"{phase}_{case}{'_bf16' if bf16 else ''}{'_loaded' if loaded else ''}"
                    rates[key] = run_case(case, phase, bf16, args, checkpoint, data, loaded)
                    print(f"{key:32s} {rates[key]:6.2f} steps/s", flush=True)
    for key, rate in rates.items():
        print(f"RESULT {key}_steps_per_s {rate:.3f}")
    speedups = {}
    for phase in args.phases:
        base = rates.get(f"{phase}_1p1t")
        two = [v for k, v in rates.items() if k.startswith(phase) and "loaded" not in k and ("2t" in k or "2p" in k)]
        if base and two:
            speedups[phase] = max(two) / base
            print(f"RESULT train_two_core_speedup_{phase} {speedups[phase]:.3f}")
    if speedups:
        total = sum(weights[p] for p in speedups)
        print(f"RESULT train_two_core_speedup {sum(speedups[p] * weights[p] for p in speedups) / total:.3f}")
    # each two-core way on its own (the main job's default is two processes in bf16: robust under load, where two
    # threads in one process are not), weighted over the stages the same way
    for case in ("1p2t", "2p1t", "1p2t_bf16", "2p1t_bf16"):
        ratios = {p: rates[f"{p}_{case}"] / rates[f"{p}_1p1t"] for p in args.phases
                  if f"{p}_{case}" in rates and f"{p}_1p1t" in rates}
        if ratios:
            mean = sum(ratios[p] * weights[p] for p in ratios) / sum(weights[p] for p in ratios)
            print(f"RESULT train_two_core_speedup_{case} {mean:.3f}")


if __name__ == "__main__":
    main()
