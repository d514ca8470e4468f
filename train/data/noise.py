"""Annotation noise: the training split's regions as a data engine with a detector and a captioner might give them.

The paper made Gran-29M with a data engine (a detector + a VLM captioner for natural images, PP-OCR for text) and
asks what the engine's errors cost (its open question 2). A recipe's ``data.annotation_noise`` corrupts the *training*
regions only (validation and the held-out test keep the true ones) in four ways a detector + captioner err:

    jitter         each box edge moves by N(0, jitter x the box's side on that axis)   (localisation error)
    miss           each true region is dropped with this chance                           (a missed object)
    spurious       per image, this many false regions on average (Poisson): a random box    (a false positive,
                   of 10-60% of the side, captioned with a caption drawn from the split     then captioned)
    wrong_caption  each kept region's caption is replaced by another caption of the split (a captioner's error)
    filters        then the engine's box rules (filters.py: aspect in [1/3, 3], area > 100 x 100 px at 448 px, here
                   scaled to the image's short side) drop what they would drop, as ``annotate`` does

An image left with no region is dropped (``annotate``'s ``min_regions``). Everything is a pure function of
(``seed``, image index), so every run and every process corrupts the same rows the same way.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass

from ..fields import typed
from .filters import FilterConfig, box_filter_reason

PAPER_SHORT_SIDE = 448  # the image size the paper's box-area rule (100 x 100 px) was written for


@dataclass(frozen=True)
class AnnotationNoise:
    jitter: float = 0.0  # std of each box edge's shift, as a fraction of the box's side
    miss: float = 0.0  # chance that a true region is missing
    spurious: float = 0.0  # false regions per image (Poisson mean)
    wrong_caption: float = 0.0  # chance that a region's caption is another caption of the split
    filters: bool = False  # apply the engine's box rules afterwards (scaled to the image size)
    seed: int = 0

    def __post_init__(self):  # typed() turns these into one-line UserErrors naming the section
        for name in ("miss", "wrong_caption"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], not {getattr(self, name)}")
        if self.jitter < 0 or self.spurious < 0:
            raise ValueError("jitter and spurious must be >= 0")

    @classmethod
    def from_recipe(cls, section: dict | None, source: str = "recipe") -> "AnnotationNoise | None":
        """The recipe's ``data.annotation_noise`` mapping, checked (keys, types, ranges); None when absent or empty."""
        return typed(cls, section, "data.annotation_noise", source) if section else None


def corrupt_regions(row: dict, index: int, noise: AnnotationNoise, captions: list[str], counts: Counter) -> list[dict]:
    """The regions `noise` leaves of `row` (a Gran row: width, height, regions of bbox / caption / kind), counting
    what it did into `counts`."""
    rng = random.Random(noise.seed * 1_000_003 + index)
    width, height = row["width"], row["height"]
    kept = []
    for region in row["regions"]:
        if rng.random() < noise.miss:
            counts["missed"] += 1
            continue
        x1, y1, x2, y2 = region["bbox"]
        if noise.jitter:
            w, h = x2 - x1, y2 - y1
            x1, x2 = (v + rng.gauss(0, noise.jitter * w) for v in (x1, x2))
            y1, y2 = (v + rng.gauss(0, noise.jitter * h) for v in (y1, y2))
            x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
            y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
            counts["jittered"] += 1
        caption = region["caption"]
        if rng.random() < noise.wrong_caption:
            caption = rng.choice([c for c in captions if c != caption] or [caption])
            counts["wrong_caption"] += 1
        kept.append({**region, "bbox": [x1, y1, x2, y2], "caption": caption})
    for _ in range(_poisson(rng, noise.spurious)):
        side = min(width, height)
        w, h = (rng.uniform(0.1, 0.6) * side for _ in range(2))
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        kind = row["regions"][0]["kind"] if row["regions"] else 0
        kept.append({"bbox": [x1, y1, x1 + w, y1 + h], "caption": rng.choice(captions), "kind": kind})
        counts["spurious"] += 1
    if noise.filters:
        rules = scaled_filters(width, height)
        survivors = []
        for region in kept:
            x1, y1, x2, y2 = region["bbox"]
            reason = "degenerate_box" if x2 - x1 < 1 or y2 - y1 < 1 else box_filter_reason(region["bbox"], rules, region["kind"])
            if reason:
                counts[f"filtered_{reason}"] += 1
            else:
                survivors.append(region)
        kept = survivors
    return kept


def scaled_filters(width: int, height: int) -> FilterConfig:
    """The paper's box rules with the area threshold scaled from a 448 px short side to this image's."""
    scale = min(width, height) / PAPER_SHORT_SIDE
    paper = FilterConfig()
    return dataclasses.replace(paper, min_box_area=paper.min_box_area * scale * scale)


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method; the means here are small)."""
    if mean <= 0:
        return 0
    limit, k, p = pow(2.718281828459045, -mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def add_annotation_noise(split, noise: AnnotationNoise):
    """(the split with its regions corrupted and images left without regions dropped, counts of what was done)."""
    rows = split.select_columns(["width", "height", "regions"]).to_list()  # one read, without the images
    captions = sorted({r["caption"] for row in rows for r in row["regions"]})
    counts: Counter = Counter()
    regions = [corrupt_regions(row, i, noise, captions, counts) for i, row in enumerate(rows)]
    counts["regions_before"] = sum(len(row["regions"]) for row in rows)
    counts["regions_after"] = sum(len(r) for r in regions)
    keep = [i for i, r in enumerate(regions) if r]
    counts["images_dropped"] = len(regions) - len(keep)
    noisy = split.remove_columns("regions").add_column("regions", regions, feature=split.features["regions"])
    return noisy.select(keep), dict(counts)
