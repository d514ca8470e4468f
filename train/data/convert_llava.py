"""LLaVA-style instruction data -> the conversational rows the `sft` stage trains on (`granvit-data convert --from llava`).

    granvit-data convert --from llava OUT --inputs llava_v1_5_mix665k.json --images data/ \\
        --box-convention normalized --checkpoint outputs/quickstart/checkpoint

Input: a JSON list (or JSONL, one object a line) of LLaVA rows, `{"id", "image": "coco/train2017/1.jpg" (or a list of
paths), "conversations": [{"from": "human", "value": "<image>\\nWhere is the dog?"}, {"from": "gpt", "value":
"[0.12, 0.30, 0.55, 0.91]"}, ...]}`; image paths are relative to --images. Roles: human / user -> user, gpt /
assistant -> assistant, system -> system. `<image>` placeholders are taken out of the text: the image goes before the
first user turn, as LLaVA itself places it and as trl's collator does.

Boxes: every `[a, b, c, d]` of four numbers in a turn is a box written in the source's convention, `--box-convention`:
  normalized  floats in [0, 1] of the image's width / height: pixel = v x size
  0-999       integers in [0, 999], 1000 bins of the image (bin = floor(v / size x 1000)): pixel = (v + 0.5) / 1000
              x size, the bin centre (what a 1000-bin GranViT checkpoint writes back as the same numbers)
  pixels      pixels of the image file as stored (without its EXIF rotation)
  none        the text is kept as it is (data without boxes; a box-like list stays text)
and is rewritten in the checkpoint's box format by the checkpoint's own codec (`processor.encode_box`), so the rows
train exactly what `ground` / `describe_regions` read and write. The text around the boxes is marked as plain text
(`processor.plain_text`): a "<box>" or "<|user|>" inside the source's text can never become a control token. Without
--box-convention a box in the data is an error (the convention cannot be guessed safely); --checkpoint is needed when
there are boxes to write.

Errors: a row the converter cannot parse (no conversations, a turn without "from"/"value", an unknown role, a box
outside its convention's range) stops the conversion before anything is written, with one line naming the file, the
row (index and id) and the turn. Counted, not fatal (a large mix has a few): `skipped` no_image (text-only rows:
GranViT trains on image conversations), no_answer (no assistant turn); `broken` missing_image, corrupt_image,
image_too_large, exif_orientation (an EXIF-rotated image with boxes: its boxes could be in either frame), and the box
rules (box_outside, box_inverted, box_zero_area) for a box that fails against its image: the row is left out.

Output: a folder `load_dataset(OUT)` reads, one row per conversation: `id`, `images` (the original encoded bytes),
`messages` ([{"role", "content"}]: trl's conversational format, which data/conversations.py passes to SFTTrainer as
it is) and `source`; shards, manifest, resume and counts as for Gran folders (schema.write_split). Train with
`granvit-train --stage sft ... data.path=OUT` on the checkpoint given here (the rows hold its box format).
"""
from __future__ import annotations

import json
import os
import re

from datasets import Features, Image, List, Value

from ...box_codec_granvit import BoxCodec
from ...console import UserError, check_model_source
from ...processing_granvit import GranViTProcessor
from .convert import EmptyOutputError, json_line, write_counted
from .schema import (
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_SHARD_BYTES,
    BadRecord,
    bump,
    box_reason,
    decode_image,
    exif_rotated,
    write_dataset_card,
)

BOX_CONVENTIONS = ("normalized", "0-999", "pixels", "none")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"
_NUMBER = r"\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*"
BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")

CONVERSATION_FEATURES = Features({
    "id": Value("string"),
    "images": List(Image()),  # original encoded bytes, never re-encoded
    "messages": List({"role": Value("string"), "content": Value("string")}),
    "source": Value("string"),
})
CARD_BODY = (
    "Conversation rows for supervised fine-tuning: `images` (list of images) and `messages` ([{`role`, `content`}], "
    "trl's conversational format), converted from LLaVA-style data by `granvit-data convert --from llava`. Boxes are "
    "written in the box format of the checkpoint named in the plan (manifest.json); source text is wrapped in "
    "GranViT's untrusted-text markers (U+E000 / U+E001).\n"
)


def _where(path: str, n: int, row, turn: int | None = None) -> str:
    ident = row.get("id") if isinstance(row, dict) else None
    return f"{path}: row {n}" + (f" (id {ident})" if ident is not None else "") + (f", turn {turn}" if turn is not None else "")


def read_rows(path: str) -> list:
    """The rows of a LLaVA JSON file (a list) or JSONL file (an object a line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); export it again as JSON") from None
    if text.lstrip()[:1] != "[":
        return [json_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix the file or export it again") from None


def parse_turn(text: str, convention: str | None, where: str) -> list:
    """A turn's text -> segments: str (text) or [v1, v2, v3, v4] (a box in the source's convention, range-checked
    where the convention fixes the range)."""
    if convention == "none":
        return [text]
    segments, start = [], 0
    for match in BOX.finditer(text):
        values = [float(g) for g in match.groups()]
        if convention is None:
            raise UserError(f"{where} holds a box {match.group(0)}; say how the source writes boxes: --box-convention "
                            f"normalized|0-999|pixels (or none to keep it as text)")
        if convention == "normalized" and not all(0.0 <= v <= 1.0 for v in values):
            raise UserError(f"{where}: {match.group(0)} is not a normalized box (values in [0, 1]); check --box-convention")
        if convention == "0-999" and not all(v.is_integer() and 0 <= v <= 999 for v in values):
            raise UserError(f"{where}: {match.group(0)} is not a 0-999 box (integers in [0, 999]); check --box-convention")
        if convention == "pixels" and min(values) < 0:
            raise UserError(f"{where}: {match.group(0)} has a negative pixel coordinate; check --box-convention")
        segments += [text[start : match.start()], values]
        start = match.end()
    return segments + [text[start:]]


def read_llava(path: str, images_dir: str, convention: str | None, source: str = "llava") -> list[dict]:
    """Items {id, images: [paths], turns: [(role, segments)], source} of one LLaVA file; a row that cannot be parsed is a
    UserError naming the file, row and turn."""
    items = []
    rows = read_rows(path)
    if not isinstance(rows, list):
        raise UserError(f"{path} is not a LLaVA file (a JSON list of rows, or JSONL); check --from and --inputs")
    stem = os.path.splitext(os.path.basename(path))[0]
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise UserError(f"{_where(path, n, row)} has no \"conversations\" list; each row needs "
                            "{\"image\", \"conversations\": [{\"from\", \"value\"}, ...]}")
        image = row.get("image")
        images = [image] if isinstance(image, str) else image if isinstance(image, list) else []
        if not all(isinstance(p, str) for p in images):
            raise UserError(f"{_where(path, n, row)}: \"image\" is {image!r}; give a path (or a list of paths)")
        turns = []
        for k, turn in enumerate(row["conversations"]):
            where = _where(path, n, row, k)
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
                raise UserError(f"{where} is not {{\"from\": ..., \"value\": \"text\"}}: {str(turn)[:80]}")
            role = ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise UserError(f"{where}: unknown role {turn['from']!r} (known: {', '.join(ROLES)})")
            text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip() if role == "user" else turn["value"]  # as LLaVA does
            turns.append((role, parse_turn(text, convention, where)))
        ident = row.get("id")
        items.append({"id": str(ident) if ident is not None else f"{stem}-{n}",
                      "images": [p if os.path.isabs(p) else os.path.join(images_dir, p) for p in images],
                      "turns": turns, "source": source})
    return items


def to_pixels(values: list[float], convention: str, size: tuple[int, int]) -> list[float]:
    width, height = size
    sizes = (width, height, width, height)
    if convention == "normalized":
        return [v * s for v, s in zip(values, sizes)]
    if convention == "0-999":  # the bin centres, as a 1000-bin GranViT checkpoint reads its own boxes back
        return BoxCodec(1000).dequantize(values, size)
    return [min(v, s) if v <= s + 1 else v for v, s in zip(values, sizes)]  # annotators round outward by up to 1 px


class LlavaProducer:
    """Checks each item's images, writes its boxes in the checkpoint's format: rows for `schema.write_split`."""

    def __init__(self, items: list[dict], convention: str | None, processor, plan: dict):
        self.items, self.convention, self.processor, self._plan = items, convention, processor, plan

    def plan(self) -> dict:
        return self._plan

    def __call__(self, start: int, stop: int, counts: dict):
        for item in self.items[start:stop]:
            try:
                record = self.record(item, counts)
            except BadRecord as e:
                bump(counts, "broken", e.reason)
                continue
            if record is not None:
                yield record

    def record(self, item: dict, counts: dict) -> dict | None:
        if not item["images"]:
            bump(counts, "skipped", "no_image")
            return None
        if not any(role == "assistant" for role, _ in item["turns"]):
            bump(counts, "skipped", "no_answer")
            return None
        has_box = any(not isinstance(s, str) for _, segments in item["turns"] for s in segments)
        images, size = [], None
        for path in item["images"]:
            if not os.path.isfile(path):
                raise BadRecord("missing_image", path)
            with open(path, "rb") as f:
                data = f.read()
            pil = decode_image({"bytes": data, "path": None})  # raises BadRecord("corrupt_image")
            limit = getattr(getattr(self.processor, "image_processor", None), "max_image_pixels", None)
            if limit and pil.width * pil.height > limit:
                raise BadRecord("image_too_large", path)  # the image processor would refuse it in training
            if has_box and exif_rotated(data):
                raise BadRecord("exif_orientation", path)
            images.append({"bytes": data, "path": None})
            size = size or pil.size  # boxes refer to the first image
        messages = [{"role": role, "content": self.content(segments, size)} for role, segments in item["turns"]]
        return {"id": item["id"], "images": images, "messages": messages, "source": item["source"]}

    def content(self, segments: list, size: tuple[int, int]) -> str:
        plain = self.processor.plain_text if self.processor is not None else _plain_text
        out = []
        for segment in segments:
            if isinstance(segment, str):
                out.append(plain(segment) if segment else "")
                continue
            box = to_pixels(segment, self.convention, size)
            reason = box_reason(box, *size)
            if reason:
                raise BadRecord(reason, str(segment))
            out.append(self.processor.encode_box(box, size))
        return "".join(out) or plain("")


def _plain_text(text: str) -> str:
    return GranViTProcessor.plain_text(text)


def convert_llava(inputs: list[str], out_dir: str, images_dir: str = "", split: str = "train",
                  box_convention: str | None = None, checkpoint: str | None = None, num_proc: int = 1,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, shard_multiple: int = 1,
                  row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """LLaVA files -> one split of conversation rows in `out_dir`; returns (and saves as counts-<split>.json) the
    counts. Every row is parsed before anything is written."""
    for path in inputs:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such annotation file; check the path")
    checkpoint = str(checkpoint) if checkpoint else None
    if box_convention is not None and box_convention not in BOX_CONVENTIONS:
        raise UserError(f"--box-convention {box_convention!r}: choose from {', '.join(BOX_CONVENTIONS)}")
    items = [item for path in inputs for item in read_llava(path, images_dir, box_convention)]
    if not items:
        raise EmptyOutputError(f"{', '.join(inputs)}: no rows; check --from and --inputs", {})
    has_box = any(not isinstance(s, str) for item in items for _, segments in item["turns"] for s in segments)
    processor = None
    if checkpoint:
        processor = GranViTProcessor.from_pretrained(check_model_source(checkpoint, "--checkpoint"))
    elif has_box:
        raise UserError("the LLaVA data holds boxes: pass --checkpoint (the GranViT checkpoint to fine-tune), whose "
                        "box format the rows are written in")
    total = sum(os.path.getsize(p) for item in items for p in item["images"] if os.path.isfile(p))
    plan = {"source": "llava", "inputs": [os.path.abspath(p) for p in inputs], "box_convention": box_convention,
            "checkpoint": checkpoint, "box_format": getattr(processor, "box_format", None),
            "num_coord_bins": getattr(processor, "num_coord_bins", None)}
    producer = LlavaProducer(items, box_convention, processor, plan)
    counts = write_counted(out_dir, split, producer, len(items), total, shard_bytes, shard_multiple, row_group_size,
                           num_proc, CONVERSATION_FEATURES)
    made = f"Converted by `granvit-data convert --from llava` (boxes: {box_convention or 'none'}"
    made += f" -> {checkpoint}'s {processor.box_format} format)." if processor is not None else ")."
    write_dataset_card(out_dir, pretty_name="SFT conversations (llava)", description=made,
                       features=CONVERSATION_FEATURES, task_categories=("image-text-to-text",), body=CARD_BODY)
    return counts


def validate_conversation_row(row: dict, decode: bool = True) -> str | None:
    """Reason why a conversation row (as stored) is unusable, or None."""
    messages, images = row.get("messages"), row.get("images")
    if not isinstance(messages, list) or not isinstance(images, list) or not images:
        return "wrong_type"
    if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
               for m in messages) or not any(m["role"] == "assistant" for m in messages):
        return "wrong_type"
    if decode:
        for image in images:
            try:
                decode_image(image)
            except BadRecord as e:
                return e.reason
    return None
