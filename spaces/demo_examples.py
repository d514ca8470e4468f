"""The demo's clickable examples: held-out images of the data a checkpoint was trained on, with true boxes and phrases.

    write_demo_examples(checkpoint_dir, test_rows, n=4)   # the training job, after training: held-out Gran rows
    load_demo_examples(folder)                            # the Space: [] when the folder has none

Layout, next to the checkpoint's weights (``granvit-push`` uploads it with the model and ships a copy with the Space):

    <checkpoint>/examples/examples.json    {"examples": [{"image": "0.png", "width": W, "height": H, "image_id": ...,
                                                          "regions": [{"bbox": [x1, y1, x2, y2], "caption": ...}]}]}
    <checkpoint>/examples/0.png ...        the images (PNG: lossless; boxes are pixels of exactly this image)

The Space imports this file from its own folder (a Space has no granvit package): reading examples needs only json;
writing them (the training job) uses the package's image decoding.
"""

import json
from pathlib import Path

EXAMPLES_DIR = "examples"
EXAMPLES_FILE = "examples.json"
MAX_REGIONS = 4  # boxes per example: one Describe call, one decode batch


def write_demo_examples(checkpoint_dir, rows, n: int = 4, max_regions: int = MAX_REGIONS) -> Path:
    """Save the first ``n`` rows that have a captioned region as demo examples; returns the examples.json path.

    rows: an iterable of Gran rows (dicts with ``image`` (PIL or ``{bytes, path}``), ``width``, ``height``,
    ``regions`` [{``bbox`` [x1, y1, x2, y2] pixels, ``caption``}]), e.g. the held-out test split.
    """
    # The training job writes examples (the granvit package is installed there); a Space only reads them.
    from granvit.gran_format import decode_image

    out = Path(checkpoint_dir) / EXAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for row in rows:
        if len(examples) == n:
            break
        regions = [{"bbox": [round(float(v), 2) for v in region["bbox"]], "caption": str(region["caption"]).strip()}
                   for region in row["regions"]]
        regions = [region for region in regions if region["caption"]][:max_regions]
        if not regions:
            continue
        image = decode_image(row["image"], rgb=True)
        if image.size != (row["width"], row["height"]):
            raise ValueError(f"row {row.get('image_id')}: image is {image.size}, the row says "
                             f"{(row['width'], row['height'])}; its boxes would be misplaced")
        name = f"{len(examples)}.png"
        image.save(out / name)
        examples.append({"image": name, "width": image.width, "height": image.height,
                         "image_id": row.get("image_id"), "regions": regions})
    if not examples:
        raise ValueError("no row has a captioned region to make a demo example from")
    path = out / EXAMPLES_FILE
    path.write_text(json.dumps({"examples": examples}, indent=1), encoding="utf-8")
    return path


def load_demo_examples(folder) -> list[dict]:
    """The examples in ``folder`` (an ``examples/`` directory) with absolute image paths; [] when it has none."""
    folder = Path(folder).resolve()
    if not (folder / EXAMPLES_FILE).is_file():
        return []
    examples = json.loads((folder / EXAMPLES_FILE).read_text(encoding="utf-8"))["examples"]
    return [{**example, "image": str(folder / example["image"])} for example in examples]
