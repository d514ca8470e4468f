"""Pixel boxes: the one definition of a valid box, of IoU and of the COCO -> GranViT box conversion.

Outside the processor a box is ``[x1, y1, x2, y2]`` in pixels of the original (EXIF-upright) image, with continuous
coordinates: it covers ``[x1, x2) x [y1, y2)``, so ``[0, 0, width, height]`` is the whole image. The processor
(``ValueError`` naming the rule), the data layer (a reason code it counts, ``train/data/schema.py``) and the metrics
(an invalid prediction is a miss, ``eval/metrics.py``) are thin wrappers over ``box_problem``.

A Hub file: it ships in every checkpoint (the processor imports it) and imports nothing but the standard library.
"""

import math

# Each rule a box can break -> the data layer's reason code for it (train/data/schema.py REASONS).
BOX_RULES = {
    "numeric": "wrong_type",
    "length": "wrong_type",
    "finite": "box_nan",
    "non-negative": "box_outside",
    "inside image": "box_outside",
    "x1 <= x2 and y1 <= y2": "box_inverted",
    "positive area": "box_zero_area",
}


def _number(value) -> float | None:
    if isinstance(value, (bool, str, bytes)):  # float("12") and float(True) work, but neither is a coordinate
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def box_problem(box, image_size: tuple[int, int] | None = None) -> tuple[str, str] | None:
    """The first rule ``box`` breaks, as ``(rule, what is wrong)``, or None for a usable box.

    ``image_size`` = (width, height) adds the bounds rules; without it only the box itself is checked (a predicted
    box scored against a reference has no image to be inside of).
    """
    try:
        values = [_number(v) for v in box]
    except TypeError:  # not iterable
        return "numeric", "must be 4 numbers [x1, y1, x2, y2]"
    if isinstance(box, (str, bytes, dict)) or any(v is None for v in values):
        return "numeric", "must be 4 numbers [x1, y1, x2, y2]"
    if len(values) != 4:
        return "length", f"must have 4 coordinates [x1, y1, x2, y2], got {len(values)}"
    x1, y1, x2, y2 = values
    if not all(math.isfinite(v) for v in values):
        return "finite", "coordinates must be finite, not NaN or inf"
    if image_size is not None:
        width, height = image_size
        if min(values) < 0:
            return "non-negative", "negative coordinate"
        if max(x1, x2) > width or max(y1, y2) > height:
            return "inside image", f"outside the {width}x{height} image"
    if x2 < x1 or y2 < y1:
        return "x1 <= x2 and y1 <= y2", "x2 < x1 or y2 < y1"
    if x2 == x1 or y2 == y1:
        return "positive area", "zero area"
    return None


def check_box(box, image_size: tuple[int, int]) -> list[float]:
    """``box`` as 4 floats, or a ``ValueError`` naming the box and the rule it breaks."""
    problem = box_problem(box, image_size)
    if problem is not None:
        rule, detail = problem
        raise ValueError(f"Box {box!r}: {detail} (rule: {rule})")
    return [float(v) for v in box]


def is_valid_box(box, image_size: tuple[int, int] | None = None) -> bool:
    return box is not None and box_problem(box, image_size) is None


def box_iou(a, b) -> float:
    """Intersection over union of two valid boxes (continuous coordinates: no +1 on widths)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def xywh_to_xyxy(box) -> list[float]:
    """COCO's ``[x, y, width, height]`` -> ``[x1, y1, x2, y2]``."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


__all__ = ["BOX_RULES", "box_iou", "box_problem", "check_box", "is_valid_box", "xywh_to_xyxy"]
