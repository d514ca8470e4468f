"""Gran records -> training examples for both stages, on streaming datasets, never crashing on a bad row.

    ds = load_dataset(path, split="train", streaming=True)
    ds = split_dataset_by_node(ds, rank, world_size)            # whole shards per rank when num_shards % world == 0
    ds = ds.shuffle(seed=0, buffer_size=256)                    # optional; see the resume caveat below
    examples = TaskBuilder(processor, tasks=("bbox2caption", "caption2bbox")).apply(ds)
    collate = TaskCollator(processor, counter)                  # counter: a SkipCounter the Trainer callback logs

or, one item per image with all its queries (what the training runner uses: every query of an image lands in the same
batch, so an answer cannot be copied from another query of the same image):

    items = ImageQueries(load_dataset(path, split="train"), builder)        # map-style
    items = StreamedImageQueries(ds, builder)                               # streaming

An example is {"image": PIL RGB, "image_id", "image_size": [w, h], "task", "prompt", "target", "boxes": [[x1, y1,
x2, y2], ...] original pixels, "skipped": {reason: n}} and, with `stage1=True`, "model_boxes" (the boxes normalized to
the padded square the model sees, for `get_region_features`) and "crops" (PIL crops of the regions from the original
image: the self-distillation teacher sees the crop, the student the region inside the whole image).

Bad rows and regions are skipped and counted by reason (schema.REASONS + "ambiguous_caption", "not_a_task",
"no_absent_caption").

Negatives (`caption2bbox_negative`, our deviation: the paper trains Caption2Bbox on present phrases only): with share s,
an image is also asked, with probability s, for a caption that names nothing in it (no region of the image has that
caption), and the target is `processor.not_found_answer` ("not found"), so the model can refuse a phrase instead of
boxing the nearest object (grounding_granvit.py). The absent caption comes from the captions of the dataset (the
first 10,000 records of a map-style dataset, collected once; a stream collects them as it goes, so its first images
have few to choose from and a resumed stream may pick different ones). On a closed vocabulary (the synthetic set)
"no region has that caption" means absent; on open data a synonym of a present object can slip in as a false negative.

Question rows of `granvit-data downstream` (data/downstream.py: a `benchmark` column instead of `regions`) give one
example each under the task "downstream": the row's prompt and answer, its `{boxN}` filled in the processor's format.
The counts travel *inside* the examples ("skipped": what was dropped since the previous example of that stream), so
they survive DataLoader worker processes; the collator folds them into one SkipCounter in the training process.

Resume: `examples.state_dict()` / `load_state_dict()` is exact without shuffling. With `.shuffle(buffer_size=...)`
the buffer content is not checkpointed (datasets refills it on resume), so a resumed run sees a slightly different
order and may skip or repeat up to `buffer_size` rows. With DataLoader workers use
`torchdata.stateful_dataloader.StatefulDataLoader` to checkpoint the per-worker states.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import torch
from datasets import Image as ImageFeature
from transformers import TrainerCallback

from ...grounding_granvit import NEGATIVE_TASK
from .downstream import downstream_example
from .schema import MAX_CAPTION_CHARS, BadRecord, check_header, check_region, decode_image

# downstream: question rows of data/downstream.py; caption2bbox_negative: the "not found" answer (module docstring)
TASKS = ("bbox2caption", "caption2bbox", NEGATIVE_TASK, "vqa", "downstream")
REGION_TASKS = ("bbox2caption", "caption2bbox")
# The question a Gran record answers without VQA annotations of its own (the "vqa" task on region data).
COUNT_QUESTION = "How many objects are in the image?"
CAPTION_POOL_RECORDS = 10_000  # records read for the absent captions of a map-style dataset


class SkipCounter:
    """Rows and regions skipped during training, by reason; `as_dict()` is what the Trainer logs."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def absorb(self, examples) -> None:
        """Fold the "skipped" deltas carried by a batch of examples into this counter."""
        for example in examples:
            self.counts.update(example.get("skipped") or {})

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}{reason}": n for reason, n in sorted(self.counts.items())}

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _sort_key(box):
    return (box[1], box[0], box[3], box[2])  # reading order: top to bottom, then left to right


class TaskBuilder:
    """Expands each Gran record into Bbox2Caption / Caption2Bbox examples for `regions_per_image` sampled regions.

    `tasks`: task names, or {task: share}: each chosen region is asked a task with probability `share` (a seeded coin
    per image, task and region). Region sampling and the coins are seeded by (seed, image_id), so a resumed or
    re-split stream yields the same examples (and an image gives the same examples in every epoch).
    `multi_box`: a Caption2Bbox target lists every region of the image sharing the caption (reading order);
    without it such ambiguous captions give no Caption2Bbox example.
    """

    def __init__(
        self,
        processor,
        tasks=REGION_TASKS,
        regions_per_image: int = 4,
        multi_box: bool = True,
        stage1: bool = False,
        seed: int = 0,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ):
        shares = dict(tasks) if isinstance(tasks, dict) else {t: 1.0 for t in tasks}
        unknown = set(shares) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
        bad = {t: v for t, v in shares.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"task shares must be in [0, 1], got {bad}")
        if stage1 and shares.get(NEGATIVE_TASK):
            raise ValueError(f"{NEGATIVE_TASK} has no region for stage 1's distillation; use it in a stage-2 phase")
        self.processor = processor
        self.shares = {t: float(v) for t, v in shares.items() if v > 0}
        self.tasks = tuple(self.shares)
        self.regions_per_image = regions_per_image
        self.multi_box = multi_box
        self.stage1 = stage1
        self.seed = seed
        self.max_caption_chars = max_caption_chars
        self.pending: Counter = Counter()  # skips not yet attached to an example (per process / worker)
        self.caption_pool: dict[str, None] = {}  # captions seen in the dataset, in first-seen order (negatives)

    @property
    def wants_captions(self) -> bool:
        return NEGATIVE_TASK in self.tasks

    def add_captions(self, records) -> None:
        """Add the captions of Gran records (dicts with "regions") to the pool absent captions are drawn from."""
        for record in records:
            for region in record.get("regions") or []:
                caption = region.get("caption") if isinstance(region, dict) else None
                if isinstance(caption, str) and caption.strip():
                    self.caption_pool.setdefault(caption.strip())

    # ---- one record ----------------------------------------------------------------------------------------------
    def _skip(self, reason: str) -> list[dict]:
        self.pending[reason] += 1
        return []

    def examples(self, record: dict) -> list[dict]:
        """All examples of one record ([] if it is unusable; the reason goes into `pending`)."""
        if isinstance(record, dict) and "benchmark" in record:
            return self._downstream(record)
        reason = check_header(record)
        if reason:
            return self._skip(reason)
        width, height = record["width"], record["height"]
        if width * height > self.processor.image_processor.max_image_pixels:
            return self._skip("image_too_large")  # the image processor would refuse it at collation
        try:
            image = decode_image(record["image"], rgb=True)
        except BadRecord as e:
            return self._skip(e.reason)
        if image.size != (width, height):
            return self._skip("size_mismatch")

        regions = []
        for region in record["regions"]:
            reason = check_region(region, width, height, self.max_caption_chars)
            if reason:
                self.pending[reason] += 1
            else:
                regions.append({"bbox": [float(v) for v in region["bbox"]], "caption": region["caption"].strip()})
        if not regions:
            return self._skip("no_regions")

        size = (width, height)
        rng = random.Random(f"{self.seed}:{record['image_id']}")
        chosen = rng.sample(regions, min(self.regions_per_image, len(regions)))
        out, seen_captions = [], set()
        for k, region in enumerate(chosen):
            if "bbox2caption" in self.tasks and self._coin(rng, "bbox2caption"):
                prompt = self.processor.bbox2caption_prompt(region["bbox"], size)
                # captions are data, not markup: plain_text keeps a "<box>" inside OCR text from becoming a token
                out.append(self._example(record, image, "bbox2caption", prompt, self.processor.plain_text(region["caption"]), [region["bbox"]]))
            if "caption2bbox" in self.tasks and region["caption"] not in seen_captions and self._coin(rng, "caption2bbox"):
                seen_captions.add(region["caption"])
                boxes = sorted((r["bbox"] for r in regions if r["caption"] == region["caption"]), key=_sort_key)
                if len(boxes) > 1 and not self.multi_box:
                    self.pending["ambiguous_caption"] += 1
                    continue
                target = self.processor.encode_boxes(boxes, size)
                out.append(self._example(record, image, "caption2bbox", self.processor.caption2bbox_prompt(region["caption"]), target, boxes))
        if NEGATIVE_TASK in self.tasks and self._coin(rng, NEGATIVE_TASK):
            present = {r["caption"] for r in regions}
            absent = [c for c in self.caption_pool if c not in present]
            if absent:
                prompt = self.processor.caption2bbox_prompt(rng.choice(absent))
                out.append(self._example(record, image, NEGATIVE_TASK, prompt, self.processor.not_found_target, []))
            else:
                self.pending["no_absent_caption"] += 1
        if "vqa" in self.tasks and self._coin(rng, "vqa"):
            question, answer = record.get("question") or COUNT_QUESTION, record.get("answer") or str(len(regions))
            out.append(self._example(record, image, "vqa", self.processor.vqa_prompt(question),
                                     self.processor.plain_text(answer), [r["bbox"] for r in regions]))
        return out

    def _downstream(self, record: dict) -> list[dict]:
        """A question row of data/downstream.py: one example, its boxes in this processor's box format."""
        if "downstream" not in self.tasks:
            return self._skip("not_a_task")  # question rows in a phase that does not train on them
        if not self._coin(random.Random(f"{self.seed}:{record.get('image_id')}"), "downstream"):
            return []
        try:
            image, prompt, target, boxes = downstream_example(self.processor, record)
        except BadRecord as e:
            return self._skip(e.reason)
        return [self._example(record, image, "downstream", prompt, target, boxes)]

    def _coin(self, rng: random.Random, task: str) -> bool:
        share = self.shares[task]
        return share >= 1 or rng.random() < share

    def _example(self, record, image, task, prompt, target, boxes) -> dict:
        example = {
            "image": image,
            "image_id": record["image_id"],
            "image_size": [record["width"], record["height"]],
            "task": task,
            "prompt": prompt,
            "target": target,
            "boxes": boxes,
        }
        if self.stage1:
            example["model_boxes"] = self.processor.image_processor.to_model_space(boxes, image.size).tolist()
            # floor/ceil: the crop covers the whole region and is at least one pixel even for a sliver of a box
            example["crops"] = [
                image.crop((math.floor(x1), math.floor(y1), max(math.ceil(x2), math.floor(x1) + 1), max(math.ceil(y2), math.floor(y1) + 1)))
                for x1, y1, x2, y2 in boxes
            ]
        return example

    # ---- streams ---------------------------------------------------------------------------------------------------
    def iter_examples(self, records):
        """Generator over any iterable of records, with pending skips attached to the next example."""
        for record in records:
            for example in self.examples(record):
                example["skipped"], self.pending = dict(self.pending), Counter()
                yield example

    def __call__(self, batch: dict) -> dict:
        """Batched `map` function: a column batch of records -> a column batch of examples."""
        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*batch.values())]
        examples = list(self.iter_examples(records))
        columns = ["image", "image_id", "image_size", "task", "prompt", "target", "boxes", "skipped"]
        if self.stage1:
            columns += ["model_boxes", "crops"]
        return {c: [e[c] for e in examples] for c in columns}

    def apply(self, dataset, batch_size: int = 8):
        """Map a Gran `IterableDataset` to examples (a map-style `Dataset`: `.to_iterable_dataset()` first). The image column is read undecoded so that a
        corrupt image reaches `examples()` (and the counter) instead of raising inside datasets' decoder."""
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
        return dataset.map(self, batched=True, batch_size=batch_size, remove_columns=list(dataset.column_names))


class ImageQueries:
    """Map-style items for training: item i = every example of record i (one image, all its queries).

    `dataset`: a map-style `datasets.Dataset` in the Gran schema (the image column is read undecoded, so a corrupt
    image is counted by the builder instead of raising in datasets' decoder). A record that gives no example (broken,
    no usable region) is counted and replaced by the next one, so every item holds at least one query.
    """

    def __init__(self, dataset, builder: TaskBuilder):
        self.dataset = dataset.cast_column("image", ImageFeature(decode=False)) if hasattr(dataset, "cast_column") else dataset
        self.builder = builder
        has_regions = "regions" in getattr(dataset, "column_names", ["regions"])
        if builder.wants_captions and not builder.caption_pool and has_regions:
            first = range(min(len(self.dataset), CAPTION_POOL_RECORDS))
            records = self.dataset.select(first).select_columns(["regions"]) if hasattr(self.dataset, "select") else \
                (self.dataset[i] for i in first)
            builder.add_captions(records)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[dict]:
        for step in range(len(self.dataset)):
            examples = self.builder.examples(self.dataset[(index + step) % len(self.dataset)])
            if examples:
                examples[0]["skipped"], self.builder.pending = dict(self.builder.pending), Counter()
                return examples
        raise ValueError("no record of the dataset gives a training example: " + str(dict(self.builder.pending)))


class StreamedImageQueries:
    """Streaming items for training: every example of one record per item, from any iterable of Gran records (a
    streaming `IterableDataset`, already split by rank). Records without examples are counted and skipped."""

    def __init__(self, records, builder: TaskBuilder):
        self.records, self.builder = records, builder

    def __iter__(self):
        for record in self.records:
            if self.builder.wants_captions and isinstance(record, dict):
                self.builder.add_captions([record])
            examples = self.builder.examples(record)
            if examples:
                examples[0]["skipped"], self.builder.pending = dict(self.builder.pending), Counter()
                yield examples


def as_torch_iterable(items):
    """A `torch.utils.data.IterableDataset` view of `StreamedImageQueries` (what the Trainer's DataLoader expects)."""
    class _Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(items)

    return _Iterable()


class TaskCollator:
    """Examples -> model batch (input_ids, attention_mask, pixel_values, labels [, image_grids] [, region_boxes,
    crop_pixel_values, crop_extents]),
    folding the examples' skip counts into `counter`. Items may be examples or lists of examples (one image each).
    `tasks`: also each sequence's task name (``batch["tasks"]``), for a trainer that balances the tasks' gradients."""

    def __init__(self, processor, counter: SkipCounter | None = None, tasks: bool = False):
        self.processor = processor
        self.counter = counter if counter is not None else SkipCounter()
        self.tasks = tasks

    def __call__(self, examples: list):
        examples = [e for item in examples for e in (item if isinstance(item, list) else [item])]
        self.counter.absorb(examples)
        batch = self.processor(
            images=[e["image"] for e in examples],
            text=[e["prompt"] for e in examples],
            targets=[e["target"] for e in examples],
            return_tensors="pt",
        )
        if "model_boxes" in examples[0]:
            batch["region_boxes"] = [torch.tensor(e["model_boxes"], dtype=torch.float32) for e in examples]  # (K, 4) each
            crops = [c for e in examples for c in e["crops"]]
            # The teacher sees each crop as one padded square, tiling or not: a crop is one region, already small.
            batch["crop_pixel_values"] = self.processor.image_processor(crops, max_tiles=0)["pixel_values"]  # (sum K, 3, S, S)
            # Where the crop's content sits in its square (top-left, aspect kept): (w, h) / max(w, h) of the pixel box.
            wh = torch.tensor([[x2 - x1, y2 - y1] for e in examples for x1, y1, x2, y2 in e["boxes"]], dtype=torch.float32)
            batch["crop_extents"] = (wh / wh.max(dim=1, keepdim=True).values).reshape(-1, 2)  # (sum K, 2) in (0, 1]
        if self.tasks:
            batch["tasks"] = [e["task"] for e in examples]
        return batch


def skip_counter_callback(counter: SkipCounter, prefix: str = "data/skipped_"):
    """A `transformers.TrainerCallback` adding the counter to every log (and to `state.log_history`)."""
    class SkipCounterCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            counts = counter.as_dict(prefix)
            if logs is not None:
                logs.update(counts)  # seen by the callbacks after this one (reporters, printers)
            if state.log_history:
                state.log_history[-1].update(counts)  # Trainer.log appends its record before calling callbacks

    return SkipCounterCallback()
