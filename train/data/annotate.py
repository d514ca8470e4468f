"""`granvit-data annotate`: raw images -> Gran shards, the way the paper made Gran-29M (arXiv 2510.21501).

    granvit-data annotate scans/ out/                                    # embedded PP-OCR: offline, one CPU
    granvit-data annotate photos/ out/ --detector ustc-community/dfine-xlarge-obj2coco \\
        --captioner Qwen/Qwen2.5-VL-7B-Instruct --limit 16 --preview preview.png     # look before spending GPU hours
    torchrun --nproc_per_node 8 -m granvit.train.data.cli annotate photos/ out/ ...   # or accelerate launch -m ...
    granvit-data annotate --dataset pages/ out/ --eval-against pages/    # + OCR precision / recall / CER

Per image (annotate_regions.py): read -> drop exact duplicates -> decode -> the paper's image filters -> route
to OCR or to detector + captioner -> box filters, near-duplicates, caption cleanup -> at least one region.
The models are in annotate_models.py; the preview grid and the OCR evaluation in annotate_review.py.

Counts (per shard in manifest.json, totals in counts-<split>.json and printed): `inputs`, `written`; per image:
`broken` (missing_image, corrupt_image), `skipped` (no_detector, no_detections, no_text, detector_error,
captioner_error, ocr_error), `filtered` duplicate_image / image_short_side / image_aspect / min_regions; per
region: `filtered` box_aspect / box_area (natural) / text_box_aspect / text_box_area (text, off by default; the rules
of filters.py, shared with `convert`) / duplicate_box / max_regions / caption_* / text_not_alnum, `broken` box
reasons. So inputs = written + broken + skipped + the image reasons of filtered. `routed` and `regions` count
natural / ocr images and written regions.

Scale: under torchrun or `accelerate launch` every rank takes every world_size-th unfinished shard (a fixed
partition of the sorted input), writes it atomically and records it in its own manifest part; after a barrier
rank 0 merges the parts into manifest.json and writes the card. A killed run, rerun with any world size, writes
exactly the missing shards, so its rows equal an uninterrupted run's (captioners decode greedily).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from dataclasses import asdict
from datetime import timedelta

import torch
from accelerate import PartialState
from datasets import Image, load_dataset
from tqdm.auto import tqdm

from .annotate_review import evaluate_ocr, write_preview
from .annotate_regions import IMAGE_REASONS, AnnotateConfig, AnnotateProducer, Annotator, InputError, load_models
from .filters import add_filter_arguments, describe_filters, filters_from_args
from .schema import (
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_SHARD_BYTES,
    Manifest,
    merge_counts,
    parse_size,
    plan_num_shards,
    remove_stale_temp_files,
    shard_bounds,
    shard_relpath,
    write_dataset_card,
    write_shard,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Ranks finish their last shards at different times (a VLM captioner on an unlucky shard): the final barrier waits.
BARRIER_TIMEOUT = timedelta(hours=12)


# ----------------------------------------------------------------------------------------------- inputs
class FileSource:
    """Image files: a folder (recursive), a glob, one image, or a text file listing paths (relative to it)."""

    def __init__(self, spec: str):
        if os.path.isdir(spec):
            paths = sorted(
                os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            ids = [os.path.relpath(p, spec).replace(os.sep, "/") for p in paths]
        elif os.path.isfile(spec) and spec.lower().endswith(IMAGE_EXTENSIONS):
            paths, ids = [spec], [os.path.basename(spec)]
        elif os.path.isfile(spec):
            try:
                with open(spec, encoding="utf-8") as f:
                    ids = [line.strip() for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{spec}: cannot read the list of images ({type(e).__name__}: {e})") from e
            base = os.path.dirname(os.path.abspath(spec))
            paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in ids]
        elif glob.has_magic(spec):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            ids = list(paths)
        else:
            raise InputError(f"{spec}: no such folder, image, list file or glob")
        if not paths:
            raise InputError(f"{spec}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.paths, self.ids, self.description = paths, ids, [os.path.abspath(spec) if os.path.exists(spec) else spec]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def total_bytes(self, n: int) -> int:
        return sum(os.path.getsize(p) for p in self.paths[:n] if os.path.isfile(p))


class DatasetSource:
    """Any `datasets` dataset (Hub name or folder) with an image column; ids from its `image_id` column if any."""

    def __init__(self, name: str, split: str = "train", column: str = "image"):
        try:
            ds = load_dataset(name, split=split)
        except (OSError, ValueError) as e:  # FileNotFoundError / DatasetNotFoundError / unknown split
            raise InputError(f"--dataset {name}: {type(e).__name__}: {e}".splitlines()[0]) from e
        if column not in ds.column_names:
            raise InputError(f"--dataset {name}: no column {column!r} (columns: {', '.join(ds.column_names)})")
        if isinstance(ds.features[column], Image):
            ds = ds.cast_column(column, Image(decode=False))  # the original bytes, decoded once, here
        self.ds, self.column = ds, column
        name_tag = os.path.basename(os.path.normpath(name)) or "dataset"
        ids = ds["image_id"] if "image_id" in ds.column_names else None
        self.ids = [str(v) for v in ids] if ids is not None else [f"{name_tag}-{i:08d}" for i in range(len(ds))]
        self.description = [os.path.abspath(name) if os.path.exists(name) else name, split, column]

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> bytes:
        cell = self.ds[i][self.column]
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            return cell["bytes"]
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not isinstance(path, str):
            raise FileNotFoundError(f"row {i}: no image bytes or path")
        with open(path, "rb") as f:
            return f.read()

    def total_bytes(self, n: int) -> int:
        return int(self.ds.data.nbytes * n / max(len(self.ds), 1))


def open_source(input_spec: str | None, dataset: str | None = None, split: str = "train", column: str = "image"):
    if dataset:
        return DatasetSource(dataset, split, column)
    if not input_spec:
        raise InputError("give INPUT (a folder, glob or list file of images) or --dataset NAME_OR_DIR")
    return FileSource(input_spec)


# ----------------------------------------------------------------------------------------------- the run
def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def find_duplicates(source, n: int, out_dir: str, split: str, state) -> dict[int, int]:
    """{input index: index of the first input with the same bytes}, hashed once (each rank a share) and saved as
    duplicates-<split>.json, so every shard on every rank and every rerun drops the same inputs."""
    path = os.path.join(out_dir, f"duplicates-{split}.json")
    if not os.path.exists(path):
        part = os.path.join(out_dir, f".hashes-{split}.rank-{state.process_index:05d}.json")
        hashes = {}
        mine = range(state.process_index, n, state.num_processes)
        for i in tqdm(mine, desc="hash", unit="img", disable=not state.is_main_process or n < 1000):
            try:
                hashes[i] = hashlib.blake2b(source.read(i), digest_size=16).hexdigest()
            except OSError:
                continue  # unreadable: counted as missing_image when its shard is written
        _atomic_json(part, hashes)
        state.wait_for_everyone()
        if state.is_main_process:
            first, duplicate_of = {}, {}
            for r in range(state.num_processes):
                name = os.path.join(out_dir, f".hashes-{split}.rank-{r:05d}.json")
                with open(name, encoding="utf-8") as f:
                    for i, h in sorted((int(k), v) for k, v in json.load(f).items()):
                        first.setdefault(h, []).append(i)
            for indices in first.values():
                for i in sorted(indices)[1:]:
                    duplicate_of[i] = min(indices)
            _atomic_json(path, duplicate_of)
        state.wait_for_everyone()
        os.remove(part)
    with open(path, encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}


def _finished(out_dir: str) -> set[str]:
    """Shards recorded in manifest.json or in any rank's part whose file is still complete."""
    done = set()
    for path in glob.glob(os.path.join(out_dir, "manifest*.json")):
        manifest = Manifest(out_dir, os.path.basename(path))
        done |= {relpath for relpath in manifest.data["shards"] if manifest.done(relpath)}
    return done


def _merge_parts(out_dir: str) -> Manifest:
    manifest = Manifest(out_dir)
    parts = sorted(glob.glob(os.path.join(out_dir, "manifest.rank-*.json")))
    for path in parts:
        manifest.data["shards"].update(Manifest(out_dir, os.path.basename(path)).data["shards"])
    manifest.save()
    for path in parts:
        os.remove(path)  # merged (and saved) first, so a crash here loses nothing
    return manifest


def distributed_state():
    """accelerate's process state (rank, world size, device) with a barrier timeout long enough for stragglers.
    Without CUDA it must be told `cpu=True`, or it treats every torchrun process as a lone one (gloo never starts)."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def annotate(
    source,
    out_dir: str,
    cfg: AnnotateConfig | None = None,
    split: str = "train",
    limit: int = 0,
    batch_size: int = 8,
    shard_images: int = 1000,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_multiple: int = 1,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    models: dict | None = None,
) -> dict:
    """Annotate `source` into split `split` of the Gran folder `out_dir`; returns the split's counts on rank 0
    (other ranks: their own). `models` ({ocr, detector, captioner}) replaces loading them from `cfg`."""
    cfg = cfg or AnnotateConfig()
    state = distributed_state()
    if models is None:  # first: a wrong model name must not leave a started output folder behind
        on_gpu = state.device.type == "cuda"
        models = load_models(cfg, state.device if on_gpu else None, torch.bfloat16 if on_gpu else None, batch_size)
    n = min(limit, len(source)) if limit else len(source)
    num_shards = plan_num_shards(source.total_bytes(n), n, shard_bytes, shard_multiple, shard_images)
    plan = {"inputs": source.description, "num_items": n, "num_shards": num_shards, **asdict(cfg)}
    plan = json.loads(json.dumps(plan))  # as stored: tuples become lists
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    with state.main_process_first():  # rank 0 clears a killed run's temp files before anyone writes
        manifest = Manifest(out_dir)
        old = manifest.data["plans"].get(split)
        if old is not None and old != plan:
            changed = ", ".join(f"{k} {old.get(k)!r} -> {plan.get(k)!r}" for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k))
            raise InputError(f"{out_dir}: split {split!r} was started with other settings ({changed}); "
                             "use a new output folder (or delete it)")
        if state.is_main_process:
            remove_stale_temp_files(out_dir)
            manifest.set_plan(split, plan)
    duplicate_of = find_duplicates(source, n, out_dir, split, state)
    done = _finished(out_dir)
    todo = [i for i in range(num_shards) if shard_relpath(split, i, num_shards) not in done]
    mine = todo[state.process_index :: state.num_processes]
    annotator = Annotator(cfg, **models)
    size = sum(stop - start for start, stop in (shard_bounds(n, num_shards, i) for i in mine))
    desc = f"annotate (rank {state.process_index} of {state.num_processes})" if state.num_processes > 1 else "annotate"
    bar = tqdm(total=size, desc=desc, unit="img", disable=not state.is_main_process)
    producer = AnnotateProducer(source, annotator, cfg, duplicate_of, batch_size, bar)
    part = Manifest(out_dir, f"manifest.rank-{state.process_index:05d}.json")
    for index in mine:
        start, stop = shard_bounds(n, num_shards, index)
        counts: dict = {}
        info = write_shard(out_dir, shard_relpath(split, index, num_shards), split, producer(start, stop, counts), row_group_size)
        info.counts = merge_counts(counts, {"written": info.rows})
        part.add(info)
    bar.close()
    state.wait_for_everyone()
    manifest = _merge_parts(out_dir) if state.is_main_process else part
    totals: dict = {}
    for shard in manifest.shards(split):
        merge_counts(totals, shard["counts"])
    if state.is_main_process:
        _atomic_json(os.path.join(out_dir, f"counts-{split}.json"), totals)
        made_by = [f"route `{cfg.route}`"] + ([f"OCR `{cfg.ocr_engine}`"] if cfg.route != "natural" else [])
        made_by += [f"detector `{cfg.detector}`", f"captioner `{cfg.captioner}`"] if cfg.detector else []
        write_dataset_card(out_dir, pretty_name="Gran (annotated)",
                           description=f"Made by `granvit-data annotate` ({', '.join(made_by)}). {describe_filters(cfg.filters)}")
    return totals


# ----------------------------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    c = AnnotateConfig()
    p.add_argument("input", nargs="?", help="a folder (recursive), glob, image, or text file listing image paths")
    p.add_argument("out", help="output Gran folder (README.md, manifest.json, data/*.parquet)")
    p.add_argument("--dataset", help="instead of INPUT: a `datasets` dataset (Hub name or folder) with an image column")
    p.add_argument("--image-column", default="image")
    p.add_argument("--dataset-split", default="train", help="split of --dataset (and of --eval-against)")
    p.add_argument("--split", default="train", help="split name to write")
    p.add_argument("--limit", type=int, default=0, help="annotate only the first N inputs (with --preview: a look first)")
    p.add_argument("--preview", help="PNG grid of the first 16 written images with their boxes and captions")
    p.add_argument("--eval-against", help="Gran dataset with the true text of these images: print OCR precision / recall / CER")
    p.add_argument("--route", choices=("auto", "natural", "ocr"), default=c.route, help="auto: OCR when text covers --ocr-coverage")
    p.add_argument("--ocr-coverage", type=float, default=c.ocr_coverage)
    p.add_argument("--detector", help="object-detection checkpoint (DETR, RT-DETR, D-FINE, ...; OWLv2 / Grounding DINO with --labels)")
    p.add_argument("--labels", nargs="+", default=[], help="class names for a zero-shot detector")
    p.add_argument("--det-threshold", type=float, default=c.det_threshold)
    p.add_argument("--nms-iou", type=float, default=c.nms_iou, help="near-duplicate boxes: IoU above this with a better box")
    p.add_argument("--max-regions", type=int, default=c.max_regions, help="per natural image (0: no limit)")
    p.add_argument("--captioner", default=c.captioner, help="`label`, a GranViT / Florence-2 / image-text-to-text checkpoint")
    p.add_argument("--prompt", default=c.prompt, help="crop captioners' prompt ({max_words} is filled in)")
    p.add_argument("--max-words", type=int, default=c.max_words, help="longer captions are rejected")
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens)
    p.add_argument("--ocr-engine", choices=("rapidocr", "transformers"), default=c.ocr_engine)
    p.add_argument("--ocr-det-model", default=c.ocr_det_model, help="--ocr-engine transformers: text detector")
    p.add_argument("--ocr-rec-model", default=c.ocr_rec_model, help="--ocr-engine transformers: text recognizer")
    p.add_argument("--text-score", type=float, default=c.text_score, help="minimum recognition confidence of a line")
    p.add_argument("--ocr-space-threshold", type=float, default=c.ocr_space_threshold,
                   help="rapidocr: a space goes between two characters when the recognizer's space probabilities in "
                        "the frames between them add up to this (0: only the spaces it reads itself)")
    p.add_argument("--source", default=c.source, help="the rows' `source` field")
    p.add_argument("--batch-size", type=int, default=8, help="images per detector call and crops per captioner call")
    p.add_argument("--shard-images", type=int, default=1000, help="at most this many inputs per shard (the unit of resume)")
    p.add_argument("--shard-size", type=parse_size, default="500MB")
    p.add_argument("--shard-multiple", type=int, default=1, help="shard count is a multiple of this (ranks x workers)")
    p.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE)
    add_filter_arguments(p, text_aliases=("ocr",))


def cmd_annotate(args) -> int:
    try:
        cfg = AnnotateConfig(
            route=args.route, ocr_coverage=args.ocr_coverage, detector=args.detector, labels=args.labels,
            det_threshold=args.det_threshold, nms_iou=args.nms_iou, max_regions=args.max_regions, captioner=args.captioner,
            prompt=args.prompt, max_words=args.max_words, max_new_tokens=args.max_new_tokens, ocr_engine=args.ocr_engine,
            ocr_det_model=args.ocr_det_model, ocr_rec_model=args.ocr_rec_model, text_score=args.text_score,
            ocr_space_threshold=args.ocr_space_threshold,
            filters=filters_from_args(args), source=args.source,
        )
        with distributed_state().main_process_first():  # rank 0 builds the `datasets` cache, the others read it
            source = open_source(args.input, args.dataset, args.dataset_split, args.image_column)
        counts = annotate(source, args.out, cfg, args.split, args.limit, args.batch_size, args.shard_images,
                          args.shard_size, args.shard_multiple, args.row_group_size)
    except InputError as e:
        print(f"granvit-data annotate: error: {e}", file=sys.stderr)
        return 2
    if not distributed_state().is_main_process:
        return 0
    print(json.dumps(counts, indent=1, sort_keys=True))
    dropped = {group: sum(v for k, v in counts.get(group, {}).items() if group != "filtered" or k in IMAGE_REASONS)
               for group in ("broken", "skipped", "filtered")}
    print(f"{counts.get('written', 0)} of {counts.get('inputs', 0)} images written ({', '.join(f'{v} {k}' for k, v in dropped.items())}); "
          f"counts saved to {os.path.join(args.out, f'counts-{args.split}.json')}")
    if args.preview and counts.get("written"):
        print(f"preview: {write_preview(args.out, args.split, args.preview)}")
    elif args.preview:
        print("preview: no image was written, nothing to draw (see the counts above)")
    if args.eval_against:
        inputs = set(source.ids[: args.limit or None])  # with --limit, the images beyond it were never seen
        try:
            scores = evaluate_ocr(args.out, args.split, args.eval_against, args.dataset_split, image_ids=inputs)
        except (OSError, ValueError) as e:  # no such dataset, or no OCR images in it: the rows are written anyway
            print(f"granvit-data annotate: error: --eval-against {args.eval_against}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        _atomic_json(os.path.join(args.out, f"eval-{args.split}.json"), scores)
        print(f"OCR against {args.eval_against} ({scores['images']} images, IoU >= 0.5):")
        for level in ("line", "word"):
            s = scores[level]
            print(f"  {level}: precision {s['precision']:.3f} recall {s['recall']:.3f} text exact {s['exact']:.3f} "
                  f"CER {s['cer']:.3f} ({s['matched']} matched of {s['num_pred']} predicted / {s['num_ref']} true)")
    return 0
