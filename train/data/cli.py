"""`granvit-data`: build, convert and check Gran datasets.

    granvit-data synth OUT --preset tiny --train 20000 --val 500 --test 500 --shard-multiple 2
    granvit-data synth OUT --train 50000 --image-size 256 --min-objects 2 --max-objects 6 --ocr-fraction 0.3 --num-proc 2
    granvit-data downstream OUT --train 1000 --val 50 --test 100 --image-size 128  # question rows, per benchmark
    granvit-data convert --from coco OUT --inputs instances_train2017.json captions_train2017.json --images train2017/ --num-proc 2
    granvit-data convert --from refcoco OUT --inputs refs.json --instances instances.json --images train2014/ --ref-split train
    granvit-data convert --from vg OUT --inputs region_descriptions.json --images VG/
    granvit-data convert --from ocr OUT --inputs TextOCR_0.1_train.json --images train_images/
    granvit-data convert --from jsonl OUT --inputs data.jsonl --images imgs/ --min-short-side 0
    granvit-data convert --from llava OUT --inputs llava.json --images imgs/ --box-convention normalized --checkpoint CKPT
    granvit-data validate OUT            # every row checked; exit code 1 if any is broken or a split is empty
    granvit-data annotate IMAGES OUT [--detector D --captioner C]   # raw images -> Gran (detector + captioner + OCR)

Shards: ~--shard-size each, their count a multiple of --shard-multiple (max world size x DataLoader workers).
A rerun with the same arguments resumes: finished shards (manifest.json) are kept, the rest are written again.
A conversion that writes no row fails (exit 2) with the count of every reason its inputs were dropped for.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import Counter

from dataclasses import fields

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ...console import UserError, console_main
from .annotate import add_arguments as add_annotate_arguments
from .annotate import cmd_annotate
from .convert import FORMATS, convert
from .convert_llava import convert_llava, validate_conversation_row
from .downstream import BENCHMARKS, validate_row, write_downstream
from .filters import add_filter_arguments, filters_from_args
from .schema import DEFAULT_ROW_GROUP_SIZE, MANIFEST, Manifest, parse_size, sha256_file, shard_split, validate_record
from .synth import COLOURS, PRESETS, SHAPES, TEXTURES, SynthConfig, write_synth


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output dataset folder (README.md, manifest.json, data/*.parquet)")
    p.add_argument("--shard-size", type=parse_size, default="500MB", help="target shard size (default 500MB)")
    p.add_argument("--shard-multiple", type=int, default=1, help="shard count is a multiple of this (world size x workers)")
    p.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE)
    p.add_argument("--num-proc", type=int, default=1, help="shards written in parallel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granvit-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic Gran set")
    _add_shard_args(p)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="base config; the options below override it")
    p.add_argument("--image-size", type=int)
    p.add_argument("--min-objects", type=int)
    p.add_argument("--max-objects", type=int)
    p.add_argument("--object-size", type=float, nargs=2, metavar=("MIN", "MAX"), help="object side / image side")
    p.add_argument("--num-sizes", type=int, choices=(1, 2, 3))
    p.add_argument("--shapes", nargs="+", choices=SHAPES)
    p.add_argument("--colours", nargs="+", choices=list(COLOURS))
    p.add_argument("--textures", nargs="+", choices=TEXTURES)
    p.add_argument("--no-duplicates", dest="allow_duplicates", action="store_const", const=False,
                   help="every object of a scene has distinct attributes")
    p.add_argument("--duplicate-prob", type=float)
    p.add_argument("--no-relations", dest="relations", action="store_const", const=False,
                   help="twins share a caption instead of getting a relation")
    p.add_argument("--max-overlap", type=float)
    p.add_argument("--ocr-fraction", type=float)

    p = sub.add_parser("downstream", help="write the synthetic downstream benchmarks (question rows)")
    _add_shard_args(p)
    p.add_argument("--train", type=int, default=1000, help="rows per benchmark")
    p.add_argument("--val", type=int, default=50, help="rows per benchmark")
    p.add_argument("--test", type=int, default=100, help="rows per benchmark (100: all ten score in under a minute "
                   "on one core with the quickstart-size model, BENCHMARKS.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="image side in px; objects and text scale with it")
    p.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), help="default: all")

    p = sub.add_parser("convert", help="convert annotations (+ images) to Gran shards (llava: to SFT conversation rows)")
    _add_shard_args(p)
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS)
    p.add_argument("--inputs", nargs="+", required=True, help="annotation files (JSON / JSONL / Parquet / label txt)")
    p.add_argument("--images", default="", help="folder the annotations' image paths are relative to")
    p.add_argument("--instances", help="refcoco JSON refs: the COCO instances JSON with boxes and image sizes")
    p.add_argument("--ref-split", help="refcoco: keep refs of this split only (train, val, testA, ...)")
    p.add_argument("--split", default="train", help="split name to write")
    p.add_argument("--box-convention", choices=("normalized", "0-999", "pixels", "none"),
                   help="llava: how the source writes boxes ([a, b, c, d] in a turn): floats in [0, 1], integers in "
                        "[0, 999], or pixels; none keeps the text as it is")
    p.add_argument("--checkpoint", help="llava: the GranViT checkpoint to fine-tune; its box format is written")
    add_filter_arguments(p)

    p = sub.add_parser("annotate", help="annotate raw images (detector + captioner, PP-OCR) into Gran shards")
    add_annotate_arguments(p)

    p = sub.add_parser("validate", help="check every row of a Gran folder or Parquet file(s)")
    p.add_argument("path", nargs="+")
    p.add_argument("--no-decode", action="store_true", help="skip image decoding (fast; misses corrupt images)")
    return parser


def cmd_synth(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(SynthConfig) if getattr(args, f.name, None) is not None}
    cfg = SynthConfig(**{**PRESETS[args.preset], **overrides})
    counts = write_synth(
        args.out, {"train": args.train, "val": args.val, "test": args.test}, cfg, args.seed, args.num_proc,
        args.shard_size, args.shard_multiple, args.row_group_size,
    )
    print(json.dumps(counts, indent=1, sort_keys=True))
    return 0


def cmd_downstream(args) -> int:
    counts = write_downstream(
        args.out, {"train": args.train, "val": args.val, "test": args.test}, args.image_size, args.seed,
        args.benchmarks, args.num_proc, args.shard_size, args.shard_multiple, args.row_group_size,
    )
    print(json.dumps(counts, indent=1, sort_keys=True))
    return 0


def cmd_convert(args) -> int:
    if args.fmt == "llava":  # conversation rows for the sft stage (convert_llava.py), not Gran rows
        counts = convert_llava(args.inputs, args.out, args.images, args.split, args.box_convention, args.checkpoint,
                               args.num_proc, args.shard_size, args.shard_multiple, args.row_group_size)
    else:
        counts = convert(
            args.fmt, args.inputs, args.out, args.images, args.split, filters_from_args(args), args.instances,
            args.ref_split, args.num_proc, args.shard_size, args.shard_multiple, args.row_group_size,
        )
    print(json.dumps(counts, indent=1, sort_keys=True))
    print(f"counts saved to {os.path.join(args.out, f'counts-{args.split}.json')}")
    return 0


def parquet_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "data", "*.parquet"))) if os.path.isdir(path) else [path]
    return files


def _split_of(file: str) -> str:
    """"<dataset folder>:<split>" for a shard of a Gran folder; any other Parquet file is a split of its own."""
    split = shard_split(file)
    return file if split is None else f"{os.path.dirname(os.path.dirname(file)) or '.'}:{split}"


def validate_paths(paths: list[str], decode: bool = True) -> dict:
    """{"rows", "ok", "broken": {reason: rows}, "checksum_mismatch": [shards], "unreadable_files": [...],
    "empty_splits": [splits with no row]}."""
    reasons: Counter = Counter()
    rows = 0
    mismatched = []
    for path in paths:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST)):
            manifest = Manifest(path)
            mismatched += [s["path"] for s in manifest.shards() if sha256_file(os.path.join(path, s["path"])) != s["sha256"]]
    unreadable = []
    split_rows: Counter = Counter()
    for file in tqdm(parquet_files(paths), desc="validate", unit="file"):
        split_rows[_split_of(file)] += 0
        try:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
                for row in batch.to_pylist():  # raw cells: image stays {bytes, path}, so decoding is checked here
                    rows += 1
                    split_rows[_split_of(file)] += 1
                    # a question row of `granvit-data downstream`, a conversation row of `convert --from llava`,
                    # or a Gran row
                    check = validate_row if "benchmark" in row else validate_conversation_row if "messages" in row else validate_record
                    reason = check(row, decode=decode)
                    if reason:
                        reasons[reason] += 1
        except (pa.ArrowException, OSError) as e:  # a damaged file: report it and check the others
            unreadable.append(f"{file}: {type(e).__name__}: {e}")
    return {
        "rows": rows, "ok": rows - sum(reasons.values()), "broken": dict(sorted(reasons.items())),
        "checksum_mismatch": mismatched, "unreadable_files": unreadable,
        "empty_splits": sorted(split for split, n in split_rows.items() if n == 0),
    }


def cmd_validate(args) -> int:
    for path in args.path:
        if not os.path.exists(path):
            raise UserError(f"{path}: no such folder or file; check the path")
        if os.path.isdir(path) and not parquet_files([path]):
            raise UserError(f"{path}: no data/*.parquet shards; pass a Gran dataset folder or Parquet files")
    report = validate_paths(args.path, decode=not args.no_decode)
    print(json.dumps(report, indent=1))
    failed = report["broken"] or report["checksum_mismatch"] or report["unreadable_files"] or report["empty_splits"]
    return 1 if failed else 0


@console_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"synth": cmd_synth, "downstream": cmd_downstream, "convert": cmd_convert, "validate": cmd_validate,
                "annotate": cmd_annotate}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
