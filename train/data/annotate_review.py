"""Look at what `granvit-data annotate` wrote: a PNG grid of boxes and captions (`--preview`), and OCR quality
against pages whose text is known (`--eval-against`, e.g. the synthetic OCR pages of `granvit-data synth`).

OCR regions hold both lines and words, and a Gran row does not say which is which, so both sides are split by one
rule (`lines_and_words`): a region with a space in its text is a line, a region without is a word, and a word
that lies inside no multi-word region is also a (one-word) line.
"""
from __future__ import annotations

import glob
import math
import os

import pyarrow.parquet as pq
from datasets import load_dataset

from ...eval.metrics import ocr_detection_scores
from .schema import KINDS, decode_image

OCR = KINDS.index("ocr")


def read_rows(out_dir: str, split: str, columns: list[str], limit: int = 0) -> list[dict]:
    """Rows of a Gran folder's split as stored (image = {bytes, path}, kinds as ClassLabel indices), shard order."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "data", f"{split}-*.parquet"))):
        rows += pq.read_table(path, columns=columns).to_pylist()
        if limit and len(rows) >= limit:
            return rows[:limit]
    return rows


def lines_and_words(regions: list[dict]) -> tuple[list, list]:
    """(lines, words), each a list of (box, text), from the OCR regions of one image (see the module docstring)."""
    texts = [(r["bbox"], " ".join(r["caption"].split())) for r in regions if r["kind"] in (OCR, "ocr")]
    multi = [box for box, text in texts if " " in text]
    words = [(box, text) for box, text in texts if " " not in text]

    def inside(box, outer) -> bool:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]

    lines = [(box, text) for box, text in texts if " " in text]
    lines += [(box, text) for box, text in words if not any(inside(box, outer) for outer in multi)]
    return lines, words


def evaluate_ocr(out_dir: str, split: str, reference: str, reference_split: str = "train", iou: float = 0.5,
                 image_ids=None) -> dict:
    """Line- and word-level `ocr_detection_scores` of the annotated split against the OCR images of `reference`
    (any Gran dataset: folder or Hub name), matched by image_id, restricted to `image_ids` (the run's inputs) when
    given; a reference image that was not written (filtered, skipped, routed to the detector) counts as all misses."""
    predicted = {r["image_id"]: r["regions"] for r in read_rows(out_dir, split, ["image_id", "regions"])}
    ref = load_dataset(reference, split=reference_split).select_columns(["image_id", "kind", "regions"])
    line_pred, line_ref, word_pred, word_ref = [], [], [], []
    for row in ref:
        if row["kind"] != OCR or (image_ids is not None and row["image_id"] not in image_ids):
            continue
        pred_lines, pred_words = lines_and_words(predicted.get(row["image_id"], []))
        ref_lines, ref_words = lines_and_words(row["regions"])
        line_pred.append(pred_lines)
        line_ref.append(ref_lines)
        word_pred.append(pred_words)
        word_ref.append(ref_words)
    if not line_ref:
        raise ValueError(f"{reference} ({reference_split}) has no OCR images to evaluate against")
    return {
        "images": len(line_ref),
        "line": ocr_detection_scores(line_pred, line_ref, iou),
        "word": ocr_detection_scores(word_pred, word_ref, iou),
    }


def write_preview(out_dir: str, split: str, path: str, max_images: int = 16, max_labels: int = 12) -> str:
    """A PNG grid of the first `max_images` rows: every box drawn, the first `max_labels` captions written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = read_rows(out_dir, split, ["image", "image_id", "kind", "regions"], limit=max_images)
    if not rows:
        raise ValueError(f"{out_dir}: no rows written in split {split!r}, nothing to preview")
    cols = math.ceil(math.sqrt(len(rows)))
    grid = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(grid, cols, figsize=(4 * cols, 4 * grid), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        image = decode_image(row["image"], rgb=True)
        ax.imshow(image)
        ax.set_title(f"{row['image_id'][-32:]} ({KINDS[row['kind']]}, {len(row['regions'])})", fontsize=7)
        for k, region in enumerate(row["regions"]):
            x1, y1, x2, y2 = region["bbox"]
            colour = "tab:orange" if region["kind"] == OCR else f"C{k % 10}"
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1))
            if k < max_labels:
                ax.text(x1, y1, region["caption"][:40], fontsize=5, color="white", va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
