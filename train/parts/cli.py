"""`granvit-parts`: train the embedded pretrained parts once, from train/configs/parts.yaml, into pretrained_parts/.

    granvit-parts                               # both parts side by side, one process each; resumable (rerun it)
    granvit-parts --only lm                     # one part (the other's entry in parts.json is kept)
    granvit-parts --check                       # do the shipped parts match the recipe? (exit 1 if not)
    granvit-parts --out /tmp/p --smoke          # tiny sizes, seconds: what the tests run

Each part is written as an ordinary Hub-format folder (config, safetensors, tokenizer, image processor) with its
report, and `parts.json` beside them records each part's recipe hash, quality figures, wall time and size. Checkpoints
go to `--work` every tenth of a part's steps, so an interrupted run continues where it stopped. How long the shipped
parts took, and on what: parts.json and BENCHMARKS.md ("Pretrained parts").
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ...console import console_main
from .recipe import PARTS_CONFIG, PartsRecipe, load_parts_recipe, part_hash
from .shipped import MAX_SHIPPED_BYTES, PART_NAMES, SHIPPED_DIR, folder_bytes, read_manifest, write_manifest
from .training import read_report, write_report

SMOKE = ["siglip.hidden=32", "siglip.layers=1", "siglip.text_hidden=32", "siglip.text_layers=1", "siglip.images=32",
         "siglip.test_images=8", "siglip.probe_images=8", "siglip.steps=2", "siglip.batch_size=8", "lm.hidden=64",
         "lm.layers=1", "lm.vocab_size=300", "lm.scenes=32", "lm.test_scenes=4", "lm.steps=2", "lm.batch_size=8"]


def train_part(name: str, parts: PartsRecipe, out: Path, work: Path, progress: bool = True, log=print) -> dict:
    """One part into `out / name` (resuming from `work / name`); returns its report."""
    from .lm import pretrain_lm
    from .siglip import pretrain_siglip

    pretrain = {"siglip": pretrain_siglip, "lm": pretrain_lm}[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(parts.threads or threads)
    try:
        return pretrain(parts, out / name, work / name, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)


def _train_in_worker(name: str, parts: PartsRecipe, out: Path, work: Path) -> dict:
    return train_part(name, parts, out, work, progress=False, log=lambda line: print(line, flush=True))


def train_parts(parts: PartsRecipe, names: list[str], out: Path, work: Path, log=print) -> dict:
    """{name: report}; with `parts.parallel` and two parts, one spawned process each (their progress as log lines)."""
    out.mkdir(parents=True, exist_ok=True)
    if parts.parallel and len(names) > 1:
        log(f"  training {' and '.join(names)} side by side ({parts.threads} thread(s) each)")
        with ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_train_in_worker, name, parts, out, work) for name in names}
            return {name: future.result() for name, future in futures.items()}
    return {name: train_part(name, parts, out, work, log=log) for name in names}


def siglip_probe(siglip_dir: Path, lm_dir: Path, parts: PartsRecipe, output_size: int = 2) -> dict:
    """The region probe (eval/probe.py) of the SigLIP part's patch grid, as GranViT reads it: shape and colour of
    held-out regions from ROIAlign features, a linear classifier fit on training scenes' regions."""
    from datasets import Dataset

    from ...eval.probe import linear_probe
    from ..build import build_granvit
    from ..data.schema import GRAN_FEATURES
    from .training import synth_records

    box_format = "tokens" if "tokens" in parts.lm.box_formats else "text"
    model, processor = build_granvit(str(siglip_dir), str(lm_dir), num_coord_bins=parts.lm.num_coord_bins,
                                     box_format=box_format)
    synth = dataclasses.replace(parts.synth_config(), image_size=parts.siglip.image_size)
    rows = {split: Dataset.from_list(synth_records(synth, parts.seed, split, n, f"probe {split}", False),
                                     features=GRAN_FEATURES)
            for split, n in (("train", parts.siglip.probe_images), ("test", parts.siglip.test_images))}
    scores = linear_probe(model, processor, rows["train"], rows["test"], output_size=output_size, seed=parts.seed)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def check(root: Path, recipe_path: Path) -> int:
    """0 if every shipped part was trained from the recipe at `recipe_path`, else 1 (with what differs)."""
    manifest, recipe = read_manifest(root), load_parts_recipe(recipe_path)
    stale = [name for name in PART_NAMES
             if manifest["parts"].get(name, {}).get("hash") != part_hash(name, recipe)]
    for name in PART_NAMES:
        entry = manifest["parts"].get(name, {})
        state = "stale: retrain it" if name in stale else "matches the recipe"
        print(f"{name}: {root / entry.get('folder', name)} (hash {entry.get('hash')}) {state}")
    return 1 if stale else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=PARTS_CONFIG, help="the parts recipe (YAML)")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="where the part folders and parts.json go")
    parser.add_argument("--work", type=Path, default=Path("outputs/parts_work"), help="checkpoints, for resuming")
    parser.add_argument("--only", choices=PART_NAMES, action="append", help="train only this part (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 steps per part: the test preset")
    parser.add_argument("--check", action="store_true", help="only say whether the parts in --out match the recipe")
    return parser.parse_args(argv)


@console_main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return check(args.out, args.config)
    parts = load_parts_recipe(args.config, (SMOKE if args.smoke else []) + args.set)
    names = args.only or list(PART_NAMES)
    start = time.time()
    print(f"granvit-parts: {', '.join(names)} from {args.config} -> {args.out} (work: {args.work})", flush=True)
    reports = train_parts(parts, names, args.out, args.work)
    # The SigLIP's region probe reads it through a GranViT built with the LM part: once both exist.
    siglip = reports.get("siglip") or read_report(args.out / "siglip")
    if siglip is not None and "probe_shape_acc" not in siglip:
        if (args.out / "lm" / "config.json").is_file():
            print("  region probe of the SigLIP part", flush=True)
            siglip.update(siglip_probe(args.out / "siglip", args.out / "lm", parts))
            write_report(args.out / "siglip", siglip)
            reports["siglip"] = siglip
        else:
            print(f"  region probe of the SigLIP part: after the LM part ({args.out / 'lm'} missing)", flush=True)
    command = " ".join(["granvit-parts"] + [a for a in (argv if argv is not None else sys.argv[1:])])
    manifest = write_manifest(args.out, parts, reports, command, args.config, names)
    shutil.rmtree(args.work, ignore_errors=True)  # finished: nothing left to resume
    total = sum(folder_bytes(args.out / entry["folder"]) for entry in manifest["parts"].values())
    print(f"done in {(time.time() - start) / 60:.1f} min; {total / 2**20:.1f} MB of parts in {args.out}"
          f" ({MAX_SHIPPED_BYTES / 2**20:.0f} MB may be shipped)")
    for name, entry in manifest["parts"].items():
        figures = {k: round(v, 3) for k, v in entry["figures"].items() if isinstance(v, float)}
        print(f"  {name}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
