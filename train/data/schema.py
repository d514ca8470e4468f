"""The Gran shard format: one `datasets.Features`, a record validator, an atomic Parquet shard writer and the card.

A Gran dataset folder loads with `load_dataset(folder)` (streaming or not) and publishes as-is to the Hub:

    README.md                                  # YAML `configs` (split -> data/<split>-*.parquet) + `dataset_info`
    manifest.json                              # finished shards: rows, bytes, sha256, per-shard counts (resume)
    data/train-00000-of-00008.parquet ...      # Parquet with the HF feature metadata, row groups of a few hundred rows

Boxes are [x1, y1, x2, y2] float32 in original-image pixels, like everywhere outside the processor.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Features, Image, List, Value
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from ...box_utils_granvit import BOX_RULES, box_problem
# Image cells and reason codes are gran_format.py's (eval/ and the demo read them too); the data layer imports them here.
from ...gran_format import EXIF_ORIENTATION, REASONS, BadRecord, decode_image, exif_rotated  # noqa: F401

KINDS = ["natural", "ocr"]

GRAN_FEATURES = Features(
    {
        "image": Image(),  # struct<bytes, path>; the original encoded bytes are kept, never re-encoded
        "image_id": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "source": Value("string"),  # "coco", "vg", "synth", ...: lets a sampler re-weight sources
        "kind": ClassLabel(names=KINDS),
        "regions": List(
            {
                "bbox": List(Value("float32"), length=4),  # xyxy, original pixels
                "caption": Value("string"),
                "kind": ClassLabel(names=KINDS),
            }
        ),
    }
)

MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 500 * 2**20  # ~0.5 GB, the size datasets' own push_to_hub aims for
DEFAULT_ROW_GROUP_SIZE = 256  # a few hundred rows: small enough to seek into, large enough to compress
MAX_CAPTION_CHARS = 1000  # a "caption" longer than this is a dumped document or a parse error, not a region

# ----------------------------------------------------------------------------------------------- validation
def box_reason(bbox, width: int, height: int) -> str | None:
    """Reason why `bbox` is not a usable xyxy box inside a width x height image, or None (the rules:
    granvit's box_utils_granvit.py)."""
    problem = box_problem(bbox, (width, height))
    return None if problem is None else BOX_RULES[problem[0]]


def check_region(region, width: int, height: int, max_caption_chars: int = MAX_CAPTION_CHARS) -> str | None:
    """Reason why one region is broken, or None."""
    if not isinstance(region, dict) or not isinstance(region.get("caption"), str):
        return "wrong_type"
    reason = box_reason(region.get("bbox"), width, height)
    if reason:
        return reason
    caption = region["caption"].strip()
    if not caption:
        return "empty_caption"
    if len(caption) > max_caption_chars:
        return "huge_caption"
    return None


def check_header(record) -> str | None:
    """Reason why the non-region fields of a row are unusable (types, image present), or None."""
    if not isinstance(record, dict):
        return "wrong_type"
    width, height = record.get("width"), record.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return "wrong_type"
    if not isinstance(record.get("image_id"), str) or not isinstance(record.get("regions"), list):
        return "wrong_type"
    if record.get("image") is None:
        return "missing_image"
    return None


def validate_record(record, decode: bool = True, max_caption_chars: int = MAX_CAPTION_CHARS) -> str | None:
    """The reason a Gran row is broken (first problem found), or None when every part of it is usable.

    `record` is a row as stored ({bytes, path} image) or as loaded by `datasets` (PIL image). With `decode`, the
    image is decoded and its size checked against width/height (a lie there would misplace every box).
    """
    reason = check_header(record)
    if reason:
        return reason
    width, height, regions = record["width"], record["height"], record["regions"]
    if decode:
        try:
            img = decode_image(record["image"])
        except BadRecord as e:
            return e.reason
        if img.size != (width, height):
            return "size_mismatch"
    if not regions:
        return "no_regions"
    for region in regions:
        reason = check_region(region, width, height, max_caption_chars)
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------------------------- sharding
def parse_size(text: str) -> int:
    """'500MB', '0.5GB', '200k', '1048576' -> bytes (the commands' --shard-size)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 0.5GB)")
    return int(float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)])


def plan_num_shards(
    total_bytes: int, num_items: int, shard_bytes: int = DEFAULT_SHARD_BYTES, shard_multiple: int = 1, max_items: int = 0
) -> int:
    """Shard count: ~`shard_bytes` each (and at most `max_items` items each, when set), rounded up to a multiple of
    `shard_multiple` (world size x workers) so `split_dataset_by_node` hands every rank whole shards; never more
    shards than items."""
    n = max(1, math.ceil(total_bytes / shard_bytes), math.ceil(num_items / max_items) if max_items else 1)
    n = math.ceil(n / shard_multiple) * shard_multiple
    if n > num_items:  # tiny sets: keep the largest multiple that still gives every shard an item
        n = max(1, (num_items // shard_multiple) * shard_multiple) if num_items >= shard_multiple else max(1, num_items)
    return n


def shard_bounds(num_items: int, num_shards: int, index: int) -> tuple[int, int]:
    """Items [start, stop) of shard `index`: a fixed partition, so a rerun rebuilds exactly the missing shards."""
    return index * num_items // num_shards, (index + 1) * num_items // num_shards


def shard_relpath(split: str, index: int, num_shards: int) -> str:
    return f"data/{split}-{index:05d}-of-{num_shards:05d}.parquet"


def shard_split(path: str) -> str | None:
    """The split of a shard written by `shard_relpath` (``.../data/train-00000-of-00008.parquet`` -> "train"), else
    None."""
    match = re.fullmatch(r"(.+)-\d{5}-of-\d{5}\.parquet", os.path.basename(path))
    return match.group(1) if match and os.path.basename(os.path.dirname(path)) == "data" else None


@dataclass
class ShardInfo:
    path: str  # relative to the dataset folder
    split: str
    rows: int
    bytes: int
    sha256: str
    counts: dict = field(default_factory=dict)  # what the producer wrote/filtered/skipped for this shard


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(out_dir: str, relpath: str, split: str, records, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                features: Features = GRAN_FEATURES) -> ShardInfo:
    """Write `records` (dicts in the `features` layout, image as {bytes, path}) to one Parquet shard, atomically.

    The rows go to a hidden temp file next to the target (same filesystem, invisible to `data/<split>-*.parquet`)
    which is fsynced and renamed into place only when complete, so a killed run never leaves a partial shard.
    """
    final = os.path.join(out_dir, relpath)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")
    schema = features.arrow_schema  # carries the `huggingface` metadata that restores Image/ClassLabel
    rows, buf = 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for record in records:
                buf.append(features.encode_example(record))
                if len(buf) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(buf, schema=schema), row_group_size=row_group_size)
                    rows, buf = rows + len(buf), []
            if buf or rows == 0:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema), row_group_size=row_group_size)
                rows += len(buf)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ShardInfo(relpath, split, rows, os.path.getsize(final), sha256_file(final))


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete temp shards left by a killed run (they are never valid: only complete files get renamed)."""
    stale = glob.glob(os.path.join(out_dir, "data", ".*.tmp-*"))
    for path in stale:
        os.remove(path)
    return stale


class Manifest:
    """manifest.json: the plan per split and every finished shard. Resume = skip shards listed here whose file is
    still there at its recorded size (`done(verify=True)` also re-hashes it; `granvit-data validate` does); a
    different plan (other inputs, settings or shard count) for a split refuses to mix runs."""

    def __init__(self, out_dir: str, name: str = MANIFEST):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, name)  # another name: one writer's part (see annotate's ranks)
        self.data = {"plans": {}, "shards": {}}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)

    def set_plan(self, split: str, plan: dict) -> None:
        old = self.data["plans"].get(split)
        if old is not None and old != plan:
            raise ValueError(
                f"{self.path}: split {split!r} was started with plan {old}, this run asks for {plan}; "
                "use a new output folder (or delete it) to change sizes or inputs"
            )
        self.data["plans"][split] = plan
        self.save()

    def done(self, relpath: str, verify: bool = False) -> bool:
        info = self.data["shards"].get(relpath)
        path = os.path.join(self.out_dir, relpath)
        if info is None or not os.path.exists(path) or os.path.getsize(path) != info["bytes"]:
            return False
        return not verify or sha256_file(path) == info["sha256"]

    def add(self, info: ShardInfo) -> None:
        self.data["shards"][info.path] = asdict(info)
        self.save()

    def drop_split(self, split: str) -> None:
        """Forget a split and delete its shards (a conversion that wrote no row leaves nothing to resume from);
        the manifest itself goes when no split is left."""
        for shard in self.shards(split):
            path = os.path.join(self.out_dir, shard["path"])
            if os.path.exists(path):
                os.remove(path)
            del self.data["shards"][shard["path"]]
        self.data["plans"].pop(split, None)
        if self.data["plans"] or self.data["shards"]:
            self.save()
        elif os.path.exists(self.path):
            os.remove(self.path)
            if os.path.isdir(os.path.join(self.out_dir, "data")) and not os.listdir(os.path.join(self.out_dir, "data")):
                os.rmdir(os.path.join(self.out_dir, "data"))

    def shards(self, split: str | None = None) -> list[dict]:
        return [s for p, s in sorted(self.data["shards"].items()) if split is None or s["split"] == split]

    def save(self) -> None:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def bump(counts: dict, group: str, reason: str, n: int = 1) -> None:
    """counts[group][reason] += n, e.g. bump(counts, "broken", "corrupt_image")."""
    bucket = counts.setdefault(group, {})
    bucket[reason] = bucket.get(reason, 0) + n


def merge_counts(total: dict, counts: dict) -> dict:
    """Add nested {name: int | {reason: int}} counts into `total` (in place) and return it."""
    for key, value in counts.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


_PRODUCER = None  # the producer inside a Pool worker: inherited through fork, never pickled (it may hold all items)


def _init_worker(producer) -> None:
    global _PRODUCER
    _PRODUCER = producer


def _write_one(job) -> ShardInfo:
    """Produce and write one shard. `producer(start, stop, counts)` yields records for items [start, stop) and
    adds what it filtered or skipped into `counts`."""
    out_dir, split, index, num_shards, num_items, row_group_size, features = job
    start, stop = shard_bounds(num_items, num_shards, index)
    counts: dict = {}
    info = write_shard(out_dir, shard_relpath(split, index, num_shards), split, _PRODUCER(start, stop, counts),
                       row_group_size, features)
    info.counts = merge_counts(counts, {"written": info.rows})
    return info


def write_split(
    out_dir: str,
    split: str,
    producer,
    num_items: int,
    total_bytes: int,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_multiple: int = 1,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    num_proc: int = 1,
    features: Features = GRAN_FEATURES,
) -> dict:
    """Write one split as shards of the `num_items` inputs that `producer` turns into records, `num_proc` shards at
    a time, resuming from the manifest. Returns the split's counts (written / filtered / broken), finished shards
    from earlier runs included. `producer` has `.plan()`: the settings that must not change between a run and
    its resume. `features`: the rows' schema (Gran rows by default; downstream.py writes question rows)."""
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    remove_stale_temp_files(out_dir)
    manifest = Manifest(out_dir)
    num_shards = plan_num_shards(total_bytes, num_items, shard_bytes, shard_multiple)
    manifest.set_plan(split, {"num_items": num_items, "num_shards": num_shards, **producer.plan()})
    todo = [i for i in range(num_shards) if not manifest.done(shard_relpath(split, i, num_shards))]
    jobs = [(out_dir, split, i, num_shards, num_items, row_group_size, features) for i in todo]
    bar = tqdm(total=num_shards, initial=num_shards - len(todo), desc=f"{split} shards", unit="shard")
    if num_proc > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(num_proc, len(jobs)), initializer=_init_worker, initargs=(producer,)) as pool:
            for info in pool.imap_unordered(_write_one, jobs):
                manifest.add(info)  # only the parent writes the manifest: no lost updates between workers
                bar.update()
    else:
        _init_worker(producer)
        for job in jobs:
            manifest.add(_write_one(job))
            bar.update()
    bar.close()
    totals: dict = {}
    for shard in manifest.shards(split):
        merge_counts(totals, shard["counts"])
    return totals


# ----------------------------------------------------------------------------------------------- dataset card
GRAN_CARD_BODY = (
    "Gran format: one row per image with `regions` = list of {`bbox` [x1, y1, x2, y2] float32 in original "
    "pixels, `caption`, `kind` natural|ocr}. Load with `load_dataset(path, split='train', streaming=True)`.\n"
)


def write_dataset_card(out_dir: str, pretty_name: str = "Gran dataset", description: str = "",
                       features: Features = GRAN_FEATURES, task_categories=("image-to-text", "object-detection"),
                       body: str = GRAN_CARD_BODY) -> str:
    """README.md with the YAML `configs` (split -> data files) and `dataset_info` (features, split sizes) that
    `load_dataset(out_dir)` and the Hub viewer read. Split sizes come from the manifest; `body` explains the rows."""
    manifest = Manifest(out_dir)
    splits = SplitDict()
    data_files = []
    for split in sorted({s["split"] for s in manifest.shards()}):
        shards = manifest.shards(split)
        splits.add(SplitInfo(split, num_bytes=sum(s["bytes"] for s in shards), num_examples=sum(s["rows"] for s in shards)))
        data_files.append({"split": split, "path": f"data/{split}-*.parquet"})
    card_data = DatasetCardData(pretty_name=pretty_name, task_categories=list(task_categories))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=splits)}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card_data)
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n# {pretty_name}\n\n{description}\n\n{body}")
    path = os.path.join(out_dir, "README.md")
    card.save(path)
    return path
