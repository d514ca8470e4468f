"""Annotation formats -> Gran shards, with the paper's filters, each counted.

Readers turn one format into items {image_id, image (path or bytes), source, kind, regions [{bbox xyxy, caption,
kind}], width/height if the annotation states them}; `ConvertProducer` then checks and filters every item while the
shards are written (`schema.write_split`: parallel, atomic, resumable). Formats:

- coco:    instances_*.json (region caption = category name) and/or captions_*.json (whole-image region), + images
- refcoco: refs as JSON (list of refs with `sentences` + COCO instances for boxes) or Parquet (one row per ref with
           `bbox` xywh, `sentences`/`answer`, `file_name` or embedded `image` bytes); the pickled refs(*).p files
           are never read: unpickling runs arbitrary code
- vg:      Visual Genome region_descriptions.json + images/<image_id>.jpg
- ocr:     PaddleOCR det labels ("path\\t[{transcription, points}]") or TextOCR JSON ({imgs, anns}); words only
- jsonl:   one Gran-like object a line: {"image": path, "regions": [{"bbox": [x1, y1, x2, y2], "caption"}], ...}

Counts: `written`; `filtered` (quality rules: image_short_side, image_aspect, min_regions count images; box_aspect,
box_area, crowd, illegible count regions); `broken` (schema.REASONS: rows for image problems, regions for box and
caption problems). A conversion that writes no row at all is an error (`EmptyOutputError`, with these counts): it
leaves no empty split behind, so a rerun with other settings starts clean.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

from ...box_utils_granvit import xywh_to_xyxy
from ...console import UserError, load_json
from .schema import (
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_SHARD_BYTES,
    BadRecord,
    Manifest,
    bump,
    check_region,
    decode_image,
    exif_rotated,
    write_dataset_card,
    write_split,
)

FORMATS = ("coco", "refcoco", "vg", "ocr", "jsonl")
# What to do about each reason every image was dropped for (the one-line error of a conversion that wrote nothing).
EMPTY_OUTPUT_HINTS = {
    "missing_image": "check --images (the folder the annotations' image paths are relative to)",
    "image_short_side": "--min-short-side 0 turns the short-side filter off",
    "image_aspect": "--max-aspect 0 turns the aspect filter off",
    "box_aspect": "--max-aspect 0 turns the aspect filter off",
    "box_area": "--min-box-area 0 turns the box-area filter off",
    "size_mismatch": "the annotations' width/height do not match the image files",
    "exif_orientation": "re-save the images without an EXIF rotation",
}


class EmptyOutputError(UserError):
    """A conversion that wrote no row; ``counts`` says why each input was dropped."""

    def __init__(self, message: str, counts: dict):
        super().__init__(message)
        self.counts = counts


def empty_output_message(counts: dict, out_dir: str, split: str) -> str:
    """One line: how many inputs, every drop reason with its count, and what to do about the main ones."""
    reasons = {}
    for group in ("filtered", "broken"):
        reasons.update({f"{group} {k}": v for k, v in sorted(counts.get(group, {}).items())})
    hints = []
    for key in sorted(reasons, key=reasons.get, reverse=True):
        hint = EMPTY_OUTPUT_HINTS.get(key.split(" ", 1)[1])
        if hint and hint not in hints:
            hints.append(hint)
    counted = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "nothing counted"
    return (f"wrote no rows to {out_dir} ({split}): {counts.get('inputs', 0)} images in, dropped: {counted}"
            + (f"; {'; '.join(hints)}" if hints else ""))



@dataclass
class FilterConfig:
    """The paper's data filters; 0 disables a rule."""

    min_short_side: int = 448  # keep images whose short side is > this
    max_aspect: float = 3.0  # keep images and boxes whose aspect ratio is in [1/max_aspect, max_aspect]
    min_box_area: float = 100 * 100  # keep boxes whose area is > this (pixels^2)
    min_regions: int = 1  # keep images with at least this many regions left


def _aspect_ok(w: float, h: float, max_aspect: float) -> bool:
    return not max_aspect or (w > 0 and h > 0 and 1 / max_aspect <= w / h <= max_aspect)


def image_filter_reason(width: int, height: int, f: FilterConfig) -> str | None:
    """The image rule (`image_short_side`, `image_aspect`) that drops a width x height image, or None."""
    if f.min_short_side and min(width, height) <= f.min_short_side:
        return "image_short_side"
    if not _aspect_ok(width, height, f.max_aspect):
        return "image_aspect"
    return None


def box_filter_reason(bbox, f: FilterConfig) -> str | None:
    """The box rule (`box_aspect`, `box_area`) that drops a valid xyxy box, or None."""
    x1, y1, x2, y2 = bbox
    if not _aspect_ok(x2 - x1, y2 - y1, f.max_aspect):
        return "box_aspect"
    if f.min_box_area and (x2 - x1) * (y2 - y1) <= f.min_box_area:
        return "box_area"
    return None


def _snap(bbox, width: int, height: int):
    """Clip coordinates that overshoot the image by at most 1 px: annotation tools round outward (COCO has many
    x + w == width + 0.5). Anything further out stays out, and check_box calls it broken."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return bbox
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return bbox
    limits = (width, height, width, height)
    return [min(max(v, 0.0), lim) if -1 <= v <= lim + 1 else v for v, lim in zip((x1, y1, x2, y2), limits)]


class ConvertProducer:
    """Checks, filters and encodes items [start, stop) into Gran records (see `schema.write_split`)."""

    def __init__(self, items: list[dict], filters: FilterConfig, fmt: str, inputs: list[str]):
        self.items, self.filters, self.fmt, self.inputs = items, filters, fmt, inputs

    def plan(self) -> dict:
        return {"source": self.fmt, "inputs": [os.path.abspath(p) for p in self.inputs], "filters": asdict(self.filters)}

    def __call__(self, start: int, stop: int, counts: dict):
        for item in self.items[start:stop]:
            record = self.record(item, counts)
            if record is not None:
                yield record

    def record(self, item: dict, counts: dict) -> dict | None:
        f = self.filters
        for reason in item.get("dropped", ()):  # regions a reader could not use (crowd, illegible text)
            bump(counts, "filtered", reason)
        data = item["image"]
        if not isinstance(data, bytes):
            if not os.path.isfile(data):
                bump(counts, "broken", "missing_image")
                return None
            with open(data, "rb") as fh:
                data = fh.read()
        try:
            pil = decode_image({"bytes": data, "path": None})
        except BadRecord as e:
            bump(counts, "broken", e.reason)
            return None
        if exif_rotated(data):
            # EXIF-rotated files: datasets shows them upright but annotations may be in either frame
            bump(counts, "broken", "exif_orientation")
            return None
        width, height = pil.size
        if item.get("width") and (item["width"], item["height"]) != (width, height):
            bump(counts, "broken", "size_mismatch")  # the boxes were drawn on some other version of this image
            return None
        reason = image_filter_reason(width, height, f)
        if reason:
            bump(counts, "filtered", reason)
            return None
        regions = []
        for region in item["regions"]:
            region = {**region, "bbox": _snap(region.get("bbox"), width, height)}
            reason = check_region(region, width, height)
            if reason:
                bump(counts, "broken", reason)
                continue
            reason = box_filter_reason(region["bbox"], f)
            if reason:
                bump(counts, "filtered", reason)
            else:
                regions.append({"bbox": region["bbox"], "caption": region["caption"].strip(), "kind": region.get("kind", item["kind"])})
        if len(regions) < max(f.min_regions, 1):  # an image without regions teaches nothing, whatever the setting
            bump(counts, "filtered", "min_regions")
            return None
        bump(counts, "regions", "written", len(regions))
        return {
            "image": {"bytes": data, "path": None},  # the original bytes: no re-encoding loss
            "image_id": str(item["image_id"]),
            "width": width,
            "height": height,
            "source": item.get("source", self.fmt),
            "kind": item["kind"],
            "regions": regions,
        }


# ----------------------------------------------------------------------------------------------- readers
def _load_json(path: str, shape: type, what: str):
    data = load_json(path)
    if not isinstance(data, shape):
        raise UserError(f"{path} is not {what}; check --from and --inputs")
    return data


def _json_line(path: str, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {number} is not valid JSON ({err}); fix the line") from None


def _image_path(images_dir: str, file_name: str) -> str:
    return file_name if os.path.isabs(file_name) else os.path.join(images_dir, file_name)


def read_coco(annotations: list[str], images_dir: str, source: str = "coco") -> list[dict]:
    """COCO instances (category name per box) and/or captions (whole-image region) JSON files, merged by image."""
    items: dict = {}
    for path in annotations:
        data = _load_json(path, dict, "a COCO annotation file (a JSON object with 'images')")
        if "images" not in data:
            raise UserError(f"{path} is not a COCO annotation file (no 'images' list); check --from and --inputs")
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        for img in data["images"]:
            items.setdefault(img["id"], {
                "image_id": f"{source}-{img['id']}", "image": _image_path(images_dir, img["file_name"]),
                "width": img.get("width"), "height": img.get("height"), "source": source, "kind": "natural",
                "regions": [], "dropped": [],
            })
        for ann in data.get("annotations", []):
            item = items.get(ann["image_id"])
            if item is None:
                continue
            if "caption" in ann and "bbox" not in ann:
                w, h = item["width"], item["height"]
                item["regions"].append({"bbox": [0.0, 0.0, float(w or 0), float(h or 0)], "caption": ann["caption"]})
            elif ann.get("iscrowd"):
                item["dropped"].append("crowd")  # a crowd box covers many objects: its category name is not its caption
            else:
                item["regions"].append({"bbox": xywh_to_xyxy(ann["bbox"]), "caption": categories.get(ann["category_id"], "")})
    return list(items.values())


def _sentences(value) -> list[str]:
    """RefCOCO sentences in their variants: ["text"], [{"sent": ...}], [{"raw": ...}], "text"."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = []
    for s in value:
        out.append(s if isinstance(s, str) else s.get("sent") or s.get("raw") or "")
    return out


def read_refcoco(refs: str, images_dir: str, instances: str | None = None, split: str | None = None, source: str = "refcoco") -> list[dict]:
    """RefCOCO/+/g as JSON refs (+ COCO instances JSON for boxes and sizes) or as Parquet (one row per ref).
    `split` keeps only refs of that split (train/val/testA/...) when the refs carry one."""
    items: dict = {}

    def add(image_key, file_name, image_bytes, bbox_xywh, sentences, width=None, height=None):
        item = items.setdefault(image_key, {
            "image_id": f"{source}-{image_key}", "image": image_bytes if image_bytes else _image_path(images_dir, file_name),
            "width": width, "height": height, "source": source, "kind": "natural", "regions": [],
        })
        for sentence in sentences:
            item["regions"].append({"bbox": xywh_to_xyxy(bbox_xywh), "caption": sentence})

    if refs.endswith(".parquet"):
        import pyarrow.parquet as pq

        for row in pq.read_table(refs).to_pylist():
            if split and row.get("split") not in (None, split):
                continue
            image = row.get("image")
            image_bytes = image.get("bytes") if isinstance(image, dict) else None
            file_name = row.get("file_name") or row.get("image_path") or (image or {}).get("path")
            key = row.get("image_id") or file_name
            sentences = _sentences(row.get("sentences") if row.get("sentences") is not None else row.get("answer"))
            add(key, file_name, image_bytes, row["bbox"], sentences)
        return list(items.values())
    if refs.endswith((".p", ".pkl", ".pickle")):
        raise UserError(f"{refs}: refusing to unpickle (it can run arbitrary code); use the JSON or Parquet distribution")
    if instances is None:
        raise UserError(f"{refs}: refcoco JSON refs need --instances (the COCO instances JSON with the boxes)")
    coco = _load_json(instances, dict, "a COCO instances file (a JSON object with 'images' and 'annotations')")
    images = {img["id"]: img for img in coco["images"]}
    anns = {ann["id"]: ann for ann in coco["annotations"]}
    for ref in _load_json(refs, list, "a RefCOCO refs file (a JSON list of refs)"):
        if split and ref.get("split") not in (None, split):
            continue
        img = images[ref["image_id"]]
        bbox = ref.get("bbox") or anns[ref["ann_id"]]["bbox"]
        add(ref["image_id"], img["file_name"], None, bbox, _sentences(ref.get("sentences")), img.get("width"), img.get("height"))
    return list(items.values())


def read_vg(regions_json: str, images_dir: str, source: str = "vg") -> list[dict]:
    """Visual Genome region_descriptions.json; images found as <image_id>.jpg anywhere under `images_dir`
    (VG ships them in VG_100K/ and VG_100K_2/)."""
    found = {}
    for root, _, files in os.walk(images_dir):
        for name in files:
            found[name] = os.path.join(root, name)
    items = []
    for entry in _load_json(regions_json, list, "Visual Genome region_descriptions.json (a JSON list)"):
        image_id = entry.get("id", entry.get("image_id"))
        regions = [
            {"bbox": [float(r["x"]), float(r["y"]), float(r["x"]) + float(r["width"]), float(r["y"]) + float(r["height"])], "caption": r["phrase"]}
            for r in entry["regions"]
        ]
        path = found.get(f"{image_id}.jpg", os.path.join(images_dir, f"{image_id}.jpg"))
        items.append({"image_id": f"{source}-{image_id}", "image": path, "source": source, "kind": "natural", "regions": regions})
    return items


def read_ocr(labels: str, images_dir: str, source: str = "ocr") -> list[dict]:
    """PaddleOCR detection labels (a text file) or TextOCR JSON; "###" / "." transcriptions mean illegible."""
    items = []
    if labels.endswith(".json"):
        data = _load_json(labels, dict, "a TextOCR file (a JSON object with 'imgs' and 'anns')")
        per_image = defaultdict(list)
        for ann in data["anns"].values():
            per_image[ann["image_id"]].append(ann)
        for image_id, img in data["imgs"].items():
            regions, dropped = [], []
            for ann in per_image[image_id]:
                if ann["utf8_string"] == ".":
                    dropped.append("illegible")
                else:
                    regions.append({"bbox": xywh_to_xyxy(ann["bbox"]), "caption": ann["utf8_string"]})
            items.append({
                "image_id": f"{source}-{image_id}", "image": _image_path(images_dir, img["file_name"]),
                "width": img.get("width"), "height": img.get("height"), "source": source, "kind": "ocr",
                "regions": regions, "dropped": dropped,
            })
        return items
    with open(labels, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise UserError(f"{labels}: line {number} is not 'image path<TAB>JSON words' (PaddleOCR labels)")
            path, annotation = line.rstrip("\n").split("\t", 1)
            regions, dropped = [], []
            for word in _json_line(labels, number, annotation):
                if word["transcription"] == "###":
                    dropped.append("illegible")
                    continue
                xs, ys = [p[0] for p in word["points"]], [p[1] for p in word["points"]]
                regions.append({"bbox": [min(xs), min(ys), max(xs), max(ys)], "caption": word["transcription"]})
            items.append({
                "image_id": f"{source}-{os.path.splitext(os.path.basename(path))[0]}", "image": _image_path(images_dir, path),
                "source": source, "kind": "ocr", "regions": regions, "dropped": dropped,
            })
    return items


def read_jsonl(path: str, images_dir: str, source: str = "jsonl") -> list[dict]:
    """One object a line: image (path), optional image_id/width/height/source/kind, regions with xyxy boxes."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            obj = _json_line(path, n + 1, line)
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise UserError(f"{path}: line {n + 1} has no \"image\" path; each line needs image and regions")
            kind = obj.get("kind", "natural")
            items.append({
                "image_id": str(obj.get("image_id", f"{source}-{n}")), "image": _image_path(images_dir, obj["image"]),
                "width": obj.get("width"), "height": obj.get("height"), "source": obj.get("source", source), "kind": kind,
                "regions": [{"bbox": r.get("bbox"), "caption": r.get("caption"), "kind": r.get("kind", kind)} for r in obj.get("regions", [])],
            })
    return items


def _num_bytes(image) -> int:
    if isinstance(image, bytes):
        return len(image)
    return os.path.getsize(image) if os.path.isfile(image) else 0  # missing files are counted when converted


def read_items(fmt: str, inputs: list[str], images_dir: str, instances: str | None = None, ref_split: str | None = None) -> list[dict]:
    for path in inputs + ([instances] if instances else []):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such annotation file; check the path")
    if fmt == "coco":
        return read_coco(inputs, images_dir)
    items = []
    for path in inputs:
        if fmt == "refcoco":
            items += read_refcoco(path, images_dir, instances, ref_split)
        elif fmt == "vg":
            items += read_vg(path, images_dir)
        elif fmt == "ocr":
            items += read_ocr(path, images_dir)
        elif fmt == "jsonl":
            items += read_jsonl(path, images_dir)
        else:
            raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    return items


def convert(
    fmt: str,
    inputs: list[str],
    out_dir: str,
    images_dir: str = "",
    split: str = "train",
    filters: FilterConfig | None = None,
    instances: str | None = None,
    ref_split: str | None = None,
    num_proc: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_multiple: int = 1,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> dict:
    """Convert annotation files to one split of a Gran folder; returns (and saves as counts-<split>.json) the counts."""
    items = read_items(fmt, inputs, images_dir, instances, ref_split)
    if not items:
        raise EmptyOutputError(f"{', '.join(inputs)}: no images found in the annotations; check --from and --inputs", {})
    items.sort(key=lambda it: it["image_id"])  # a fixed order: shard i holds the same items on every (re)run
    total = sum(_num_bytes(it["image"]) for it in items)
    producer = ConvertProducer(items, filters or FilterConfig(), fmt, inputs + ([instances] if instances else []))
    counts = write_split(out_dir, split, producer, len(items), total, shard_bytes, shard_multiple, row_group_size, num_proc)
    counts["inputs"] = len(items)
    with open(os.path.join(out_dir, f"counts-{split}.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=1, sort_keys=True)
    if not counts.get("written"):
        Manifest(out_dir).drop_split(split)
        raise EmptyOutputError(empty_output_message(counts, out_dir, split), counts)
    write_dataset_card(out_dir, pretty_name=f"Gran ({fmt})", description=f"Converted by `granvit-data convert --from {fmt}`.")
    return counts
