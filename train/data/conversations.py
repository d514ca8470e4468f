"""Gran records -> the rows trl's trainers read: conversations for `SFTTrainer`, grounding prompts for `GRPOTrainer`.

    sft_items(split, builder)          one item per image: {"images": [image], "conversations": [messages, ...]}
    grounding_prompts(split, builder)  one row per image: {"prompt": [user message], "image", "box", "image_size"}

SFT: every query the builder makes of an image (data/tasks.py: VQA, region captions, grounding) is its own single-turn
conversation ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]``, and the item holds all
of them, so they land in the same batch (as in the other stages). They are not one multi-turn chat: a Bbox2Caption turn
would show the box that a later Caption2Bbox turn asks for. A dataset whose rows already are trl conversations
("messages" + "images" or "image", trl's conversational format) is used as it is: any user SFT data in that shape.

GRPO: one Caption2Bbox query per image, on the region the builder samples for it (seeded by the image id), whose
caption names exactly one region of the image (``multi_box=False``), so a completion is scored against one true box.

Rows are made on access (`Dataset.with_transform` over the record indices): nothing is decoded or written up front, and
the Trainer's sampler, resume and DDP sharding work as for any map-style dataset. An unusable record is counted and
replaced by the next one (`ImageQueries`); its counts travel in the row's "skipped".
"""

from __future__ import annotations

from datasets import Dataset

from .tasks import ImageQueries, TaskBuilder


def conversation(example: dict) -> list[dict]:
    """A TaskBuilder example as a trl conversation; prompt and answer strings are kept exactly (untrusted-text markers
    and box tokens included), so the tokens equal those the TaskCollator of the other stages makes."""
    return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["target"]}]


def _on_access(split, row) -> Dataset:
    """A map-style Dataset of len(split) rows, row i = row(i), computed when read."""

    def transform(batch: dict) -> dict:
        rows = [row(i) for i in batch["index"]]
        return {key: [r[key] for r in rows] for key in rows[0]}

    return Dataset.from_dict({"index": list(range(len(split)))}).with_transform(transform)


def is_conversational(split) -> bool:
    return "messages" in split.column_names and bool({"images", "image"} & set(split.column_names))


def sft_items(split, builder: TaskBuilder) -> Dataset:
    """SFT items of a Gran split (one per image, every query a conversation), or the split itself when its rows are
    conversations already."""
    if is_conversational(split):
        return split
    if "regions" not in split.column_names:
        raise ValueError(f"SFT data needs Gran rows (regions) or trl conversations (messages + images); the split has "
                         f"columns {split.column_names}")
    queries = ImageQueries(split, builder)

    def row(i: int) -> dict:
        examples = queries[i]
        return {"images": [examples[0]["image"]], "conversations": [conversation(e) for e in examples],
                "image_id": examples[0]["image_id"], "skipped": examples[0]["skipped"]}

    return _on_access(split, row)


def grounding_prompts(split, builder: TaskBuilder) -> Dataset:
    """GRPO prompts of a Gran split: a Caption2Bbox query per image with its true pixel box and the image size."""
    if set(builder.tasks) != {"caption2bbox"} or builder.multi_box or builder.regions_per_image != 1:
        raise ValueError("grounding prompts need a TaskBuilder with tasks {'caption2bbox'}, regions_per_image=1, "
                         "multi_box=False (one query per image, one true box per query)")
    queries = ImageQueries(split, builder)

    def row(i: int) -> dict:
        example = queries[i][0]
        return {"prompt": [{"role": "user", "content": example["prompt"]}], "image": example["image"],
                "box": example["boxes"][0], "image_size": example["image_size"], "image_id": example["image_id"],
                "skipped": example["skipped"]}

    return _on_access(split, row)
