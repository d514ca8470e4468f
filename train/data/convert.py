"""Annotation formats -> Gran shards, with the paper's filters, each counted.

Readers turn one format into items {image_id, image (path or bytes), source, kind, regions [{bbox xyxy, caption,
kind}], width/height if the annotation states them}; `ConvertProducer` then checks and filters every item while the
shards are written (`schema.write_split`: parallel, atomic, resumable). Formats:

- coco:    instances_*.json (region caption = category name) and/or captions_*.json (whole-image region), + images
- refcoco: the `refer` toolkit's refs(unc).p / refs(umd).p / refs(google).p (read by `DataOnlyUnpickler`: plain
           data only, a pickle that would load any class or function is refused before anything runs) or the same
           refs as JSON, + the COCO instances JSON shipped beside them (boxes, sizes); or Parquet (one row per ref
           with `bbox` xywh, `sentences`/`answer`, `file_name` or embedded `image` bytes)
- vg:      Visual Genome region_descriptions.json + images/<image_id>.jpg
- ocr:     PaddleOCR det labels ("path\\t[{transcription, points}]") or TextOCR JSON ({imgs, anns}); words only
- jsonl:   one Gran-like object a line: {"image": path, "regions": [{"bbox": [x1, y1, x2, y2], "caption"}], ...}
- llava:   LLaVA-style instruction data -> conversation rows for the sft stage, not Gran rows (convert_llava.py)

Filters (filters.py, shared with `granvit-data annotate`): the paper's image rules for every image, its box rules for
natural regions only; text (OCR) regions keep their shape and size unless text rules are set.

Counts: `written`; `filtered` (quality rules: image_short_side, image_aspect, min_regions count images; box_aspect,
box_area, text_box_aspect, text_box_area, crowd, illegible count regions); `broken` (schema.REASONS: rows for image
problems, regions for box and caption problems). A conversion that writes no row at all is an error
(`EmptyOutputError`, with these counts): it leaves no empty split behind, so a rerun with other settings starts clean.
"""
from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict
from dataclasses import asdict

import pyarrow.parquet as pq

from ...box_utils_granvit import xywh_to_xyxy
from ...console import UserError, load_json
from .schema import (
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_SHARD_BYTES,
    GRAN_FEATURES,
    BadRecord,
    Manifest,
    bump,
    check_region,
    decode_image,
    exif_rotated,
    write_dataset_card,
    write_split,
)
from .filters import FilterConfig, box_filter_reason, describe_filters, image_filter_reason  # noqa: F401 (re-exported)

GRAN_FORMATS = ("coco", "refcoco", "vg", "ocr", "jsonl")
FORMATS = GRAN_FORMATS + ("llava",)  # every --from of granvit-data convert
# What to do about each reason every image was dropped for (the one-line error of a conversion that wrote nothing).
EMPTY_OUTPUT_HINTS = {
    "missing_image": "check --images (the folder the annotations' image paths are relative to)",
    "image_short_side": "--min-short-side 0 turns the short-side filter off",
    "image_aspect": "--max-aspect 0 turns the aspect filter off",
    "box_aspect": "--max-aspect 0 turns the aspect filter off",
    "box_area": "--min-box-area 0 turns the box-area filter off",
    "text_box_aspect": "--text-max-aspect 0 turns the text aspect filter off",
    "text_box_area": "--text-min-box-area 0 turns the text box-area filter off",
    "size_mismatch": "the annotations' width/height do not match the image files",
    "exif_orientation": "re-save the images without an EXIF rotation",
    "box_outside": "boxes fall outside their images: check how the source writes boxes (llava: --box-convention)",
    "no_image": "rows without an image are left out: GranViT fine-tunes on image conversations",
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



def _snap(bbox, width: int, height: int):
    """Clip coordinates that overshoot the image by at most 1 px: annotation tools round outward (COCO has many
    x + w == width + 0.5). Anything further out stays out, and schema.box_reason calls it broken."""
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
            kind = region.get("kind", item["kind"])
            reason = box_filter_reason(region["bbox"], f, kind)
            if reason:
                bump(counts, "filtered", reason)
            else:
                regions.append({"bbox": region["bbox"], "caption": region["caption"].strip(), "kind": kind})
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


def json_line(path: str, number: int, line: str):
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
    """RefCOCO/+/g refs as the `refer` toolkit ships them (refs(unc).p etc., read as plain data only) or as JSON, +
    the COCO instances JSON for boxes and sizes; or Parquet (one row per ref). One region per sentence of a ref.
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
    if instances is None:
        raise UserError(f"{refs}: refcoco refs need --instances (the COCO instances JSON with the boxes, shipped "
                        "beside the refs: refcoco/instances.json)")
    coco = _load_json(instances, dict, "a COCO instances file (a JSON object with 'images' and 'annotations')")
    images = {img["id"]: img for img in coco["images"]}
    anns = {ann["id"]: ann for ann in coco["annotations"]}
    if refs.endswith(PICKLE_SUFFIXES):
        ref_list = load_data_pickle(refs, "RefCOCO refs")
        if not isinstance(ref_list, list) or not all(isinstance(r, dict) for r in ref_list):
            raise UserError(f"{refs} is not a RefCOCO refs pickle (a list of refs); check --from and --inputs")
    else:
        ref_list = _load_json(refs, list, "a RefCOCO refs file (a JSON list of refs)")
    for n, ref in enumerate(ref_list):
        if split and ref.get("split") not in (None, split):
            continue
        img = images.get(ref.get("image_id"))
        ann = anns.get(ref.get("ann_id"))
        if img is None or (ann is None and not ref.get("bbox")):
            missing = "image_id" if img is None else "ann_id"
            raise UserError(f"{refs}: ref {ref.get('ref_id', n)} has {missing} {ref.get(missing)!r}, which {instances} "
                            "does not hold; pass the instances.json shipped with these refs")
        bbox = ref.get("bbox") or ann["bbox"]
        add(ref["image_id"], img["file_name"], None, bbox, _sentences(ref.get("sentences")), img.get("width"), img.get("height"))
    return list(items.values())


PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or function: refused before anything of it ran."""


class DataOnlyUnpickler(pickle.Unpickler):
    """Lists, dicts, tuples, sets, strings, bytes, numbers, booleans and None, nothing else. `find_class` is the one
    way a pickle reaches a class or a function (GLOBAL, STACK_GLOBAL, INST, OBJ and the copyreg extension codes all
    go through it; REDUCE and BUILD need what it returns) and it admits nothing, so a pickle that would build an
    object or call a function fails at that opcode, before anything of it runs: Python's documented "Restricting
    Globals" recipe with an empty allow-list. Persistent ids are refused by the base class."""

    def find_class(self, module, name):
        raise ForbiddenGlobal(f"it would load the Python object {module}.{name}")


def load_data_pickle(path: str, what: str):
    """The plain data of a pickle file (`DataOnlyUnpickler`); anything else is a one-line UserError naming the file.
    Python 2 pickles (the `refer` toolkit's refs(unc).p) hold byte strings: read as UTF-8, else as Latin-1."""
    for encoding in ("utf-8", "latin-1"):
        try:
            with open(path, "rb") as f:
                return DataOnlyUnpickler(f, encoding=encoding).load()
        except UnicodeDecodeError:
            continue  # a Python 2 byte string that is not UTF-8: the Latin-1 pass reads every byte
        except ForbiddenGlobal as e:
            raise UserError(f"{path}: refused to unpickle: {e}, and {what} hold only lists, dicts, strings and "
                            "numbers; nothing in the file was run. Use the file from the dataset's own download") from None
        except Exception as e:  # a damaged or non-pickle file: any error of the opcode reader, nothing executed
            raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); download it again") from None
    raise AssertionError("unreachable: Latin-1 decodes every byte string")


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
    """PaddleOCR detection labels (a text file) or TextOCR JSON; "###" / "." transcriptions mean illegible. TextOCR's
    file names ("train/<id>.jpg") are also looked up by base name in `images_dir` (its zip unpacks to train_images/)."""
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
            path = _image_path(images_dir, img["file_name"])
            if not os.path.exists(path) and os.path.exists(os.path.join(images_dir, os.path.basename(path))):
                path = os.path.join(images_dir, os.path.basename(path))  # "train/<id>.jpg" unpacked as train_images/<id>.jpg
            items.append({
                "image_id": f"{source}-{image_id}", "image": path,
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
            for word in json_line(labels, number, annotation):
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
            obj = json_line(path, n + 1, line)
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


def write_counted(out_dir: str, split: str, producer, num_items: int, total_bytes: int, shard_bytes: int,
                  shard_multiple: int, row_group_size: int, num_proc: int, features=GRAN_FEATURES) -> dict:
    """`write_split`, then the counts (+ `inputs`) saved as counts-<split>.json; a split that got no row is dropped
    from the manifest and raised as `EmptyOutputError`."""
    counts = write_split(out_dir, split, producer, num_items, total_bytes, shard_bytes, shard_multiple, row_group_size,
                         num_proc, features)
    counts["inputs"] = num_items
    with open(os.path.join(out_dir, f"counts-{split}.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=1, sort_keys=True)
    if not counts.get("written"):
        Manifest(out_dir).drop_split(split)
        raise EmptyOutputError(empty_output_message(counts, out_dir, split), counts)
    return counts


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
    """Convert annotation files to one split of a Gran folder; returns (and saves as counts-<split>.json) the counts.
    (`--from llava` writes conversation rows instead: convert_llava.py; the command picks the converter.)"""
    if fmt not in GRAN_FORMATS:
        raise UserError(f"--from {fmt}: convert writes Gran rows from {', '.join(GRAN_FORMATS)} (llava: convert_llava)")
    items = read_items(fmt, inputs, images_dir, instances, ref_split)
    if not items:
        raise EmptyOutputError(f"{', '.join(inputs)}: no images found in the annotations; check --from and --inputs", {})
    items.sort(key=lambda it: it["image_id"])  # a fixed order: shard i holds the same items on every (re)run
    total = sum(_num_bytes(it["image"]) for it in items)
    producer = ConvertProducer(items, filters or FilterConfig(), fmt, inputs + ([instances] if instances else []))
    counts = write_counted(out_dir, split, producer, len(items), total, shard_bytes, shard_multiple, row_group_size, num_proc)
    write_dataset_card(out_dir, pretty_name=f"Gran ({fmt})",
                       description=f"Converted by `granvit-data convert --from {fmt}`. {describe_filters(producer.filters)}")
    return counts
