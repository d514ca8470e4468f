"""The Gran formats that training, evaluation and the demo all read, in one module below them (train/ imports eval/,
so what eval/ needs of the data layer lives here, not in train/data/):

- image cells: an ``Image()`` cell, a PIL image or a path -> the EXIF-upright image (``decode_image``), and the reason
  codes a row or region is rejected with (``REASONS``, ``BadRecord``);
- the synthetic set's captions, "[size] colour [texture] shape": their vocabulary, which train/data/synth.py draws
  and eval/probe.py reads back as labels;
- downstream question rows (train/data/downstream.py writes them): their answer letters, ``{boxN}`` placeholders and
  the prompt that training and evaluation both feed the model (``downstream_prompt``), with the answer instructions
  of real VQA / multiple-choice prompts.

It imports only PIL and the Hub files.
"""

from __future__ import annotations

import io
import os
import re

from PIL import Image as PILImage
from PIL import ImageOps

from .image_processing_granvit import to_rgb

EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------------------------- image cells
# Every reason a row or region can be rejected as broken (as opposed to filtered by a quality rule).
REASONS = (
    "wrong_type",
    "missing_image",
    "corrupt_image",
    "size_mismatch",
    "no_regions",
    "box_nan",
    "box_outside",
    "box_inverted",
    "box_zero_area",
    "empty_caption",
    "huge_caption",
    "exif_orientation",
    "image_too_large",
    # downstream question rows (downstream.py)
    "unknown_metric",
    "bad_placeholder",
    "empty_answer",
    "bad_choice",
)


class BadRecord(ValueError):
    """A record (or region) that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(image, rgb: bool = False) -> PILImage.Image:
    """Fully decode an image cell: an `Image()` cell ({bytes, path} dict), a PIL image or a path. Returns the
    EXIF-upright image; with `rgb`, converted to RGB as the model converts it (`image_processing_granvit.to_rgb`: alpha
    on white, 16-bit scaled). Raises BadRecord on missing or corrupt data.

    A full `load()` (not just `verify()`) is needed: truncated JPEGs open and verify fine and only fail on decode.
    """
    if isinstance(image, (str, os.PathLike)):
        image = {"bytes": None, "path": os.fspath(image)}
    if isinstance(image, PILImage.Image):
        img = image
        img.load()
    elif not isinstance(image, dict):
        raise BadRecord("wrong_type", f"image is {type(image).__name__}")
    else:
        data, path = image.get("bytes"), image.get("path")
        if data is None:
            if not path or not os.path.isfile(path):
                raise BadRecord("missing_image", str(path))
            with open(path, "rb") as f:
                data = f.read()
        try:
            img = PILImage.open(io.BytesIO(data))
            img.load()
        except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
            # PIL raises UnidentifiedImageError (an OSError) for garbage, OSError for truncation, SyntaxError for
            # some broken PNG chunks, DecompressionBombError for absurd sizes.
            raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}") from e
    if rgb:
        return to_rgb(img)  # EXIF applied there too
    # datasets' Image feature and the image processor both show the EXIF-upright image: so must the checks
    return ImageOps.exif_transpose(img) if img.getexif().get(EXIF_ORIENTATION, 1) != 1 else img


def exif_rotated(data: bytes) -> bool:
    """Whether encoded image bytes carry an EXIF rotation (`decode_image` returns such images upright)."""
    return PILImage.open(io.BytesIO(data)).getexif().get(EXIF_ORIENTATION, 1) != 1


# ----------------------------------------------------------------------------------------------- synthetic captions
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLOURS = {  # name -> the RGB the generator paints
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}


# ----------------------------------------------------------------------------------------------- downstream rows
LETTERS = "ABCDEFGH"  # the answer letters of multiple-choice rows
PLACEHOLDER = re.compile(r"\{box(\d+)\}")  # "{box0}" in a question or choice: the row's box 0, in the box format
# The instruction real VQA / multiple-choice prompts end with (lmms-eval's conventions for these benchmarks).
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def fill_boxes(processor, text: str, boxes, image_size) -> str:
    """`text` with `{boxN}` replaced by `processor.encode_box(boxes[N])`, as a prompt string: the words are marked as
    user text (they can never become control tokens), the boxes are the processor's own box tokens."""
    parts = PLACEHOLDER.split(text)  # [text, index, text, index, ..., text]
    return "".join(processor.encode_box(boxes[int(p)], image_size) if k % 2 else processor.plain_text(p)
                   for k, p in enumerate(parts))


def downstream_prompt(processor, row: dict) -> str:
    """The user prompt of a row in `processor`'s box format (what training and evaluation both feed the model)."""
    size = (row["width"], row["height"])
    if row["metric"] == "grounding_acc50":
        return processor.caption2bbox_prompt(row["question"])
    text = row["question"]
    if row["metric"] == "choice":
        text += "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(row["choices"])) + CHOICE_SUFFIX
    elif row["metric"] == "exact":
        text += VQA_SUFFIX
    return processor.vqa_template.replace("{question}", fill_boxes(processor, text, row["boxes"], size))
