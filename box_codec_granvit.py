"""The box codec: pixel boxes <-> quantized bins <-> the text a model reads and writes, in either box format.

One small object (as Florence-2 keeps its coordinate quantizer) used by the processor, the box grammar, the embedded
LM part's text corpus and the demo, so the quantization rule and the box syntax are written once:

- quantize: each coordinate normalized to its image side, ``bin = min(floor(v / size * N), N - 1)``;
- dequantize: bin centres, ``(bin + 0.5) / N * size``, so a round trip is exact to within half a bin;
- ``"text"`` (the paper's box format): ``[x1, y1, x2, y2]`` in digits, several boxes joined by ``", "``;
- ``"tokens"``: ``<box><coord_a><coord_b><coord_c><coord_d></box>``, 6 added tokens per box.

A Hub file: it ships in every checkpoint and imports nothing but the standard library and ``box_utils_granvit``.
"""

import re
from dataclasses import dataclass

from .box_utils_granvit import check_box

BOX_FORMATS = ("text", "tokens")
BOX_START, BOX_END = "<box>", "</box>"
# The text format's syntax, "[a, b, c, d]" and ", " between two boxes of one answer; the text box grammar
# (box_grammar_granvit.py) is built from these pieces.
TEXT_BOX_OPEN, TEXT_BOX_CLOSE, TEXT_COORD_SEPARATOR = "[", "]", ", "
TEXT_BOX_SEPARATOR = ", "


def coord_token(i: int) -> str:
    return f"<coord_{i}>"


COORD_TOKEN_PATTERN = r"<coord_(\d{1,6})>"  # a coordinate token in decoded text; its group is the bin


@dataclass(frozen=True)
class BoxCodec:
    """Quantization into ``num_bins`` bins and the box syntax of ``box_format``."""

    num_bins: int = 1000
    box_format: str = "tokens"

    def __post_init__(self):
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")

    # ---- numbers --------------------------------------------------------------------------------------------------
    def quantize(self, box, image_size: tuple[int, int]) -> list[int]:
        """``[x1, y1, x2, y2]`` original pixels -> 4 bins (the box is checked first: ValueError naming the rule)."""
        x1, y1, x2, y2 = check_box(box, image_size)
        width, height = image_size
        n = self.num_bins
        return [min(int(v / size * n), n - 1) for v, size in ((x1, width), (y1, height), (x2, width), (y2, height))]

    def dequantize(self, bins, image_size: tuple[int, int]) -> list[float]:
        """4 bins -> the box of their bin centres in original pixels."""
        width, height = image_size
        return [(b + 0.5) / self.num_bins * size for b, size in zip(bins, (width, height, width, height))]

    # ---- text -----------------------------------------------------------------------------------------------------
    def format_bins(self, bins) -> str:
        """Four bins in the box format: ``[a, b, c, d]`` (text) or ``<box><coord_a>..<coord_d></box>`` (tokens)."""
        if self.box_format == "text":
            return TEXT_BOX_OPEN + TEXT_COORD_SEPARATOR.join(str(int(b)) for b in bins) + TEXT_BOX_CLOSE
        return BOX_START + "".join(coord_token(int(b)) for b in bins) + BOX_END

    def encode(self, box, image_size: tuple[int, int]) -> str:
        return self.format_bins(self.quantize(box, image_size))

    def encode_many(self, boxes, image_size: tuple[int, int]) -> str:
        """Several boxes as one answer (a caption matching more than one region)."""
        separator = TEXT_BOX_SEPARATOR if self.box_format == "text" else ""
        return separator.join(self.encode(box, image_size) for box in boxes)

    @property
    def pattern(self) -> re.Pattern:
        """A regex matching one box of this format in decoded text; its 4 groups are the bins."""
        if self.box_format == "text":  # spaces around the numbers are optional when reading
            separator = r"\s*" + re.escape(TEXT_COORD_SEPARATOR.strip()) + r"\s*"
            return re.compile(re.escape(TEXT_BOX_OPEN) + r"\s*" + separator.join([r"(\d{1,6})"] * 4) + r"\s*"
                              + re.escape(TEXT_BOX_CLOSE))
        return re.compile(re.escape(BOX_START) + r"\s*" + r"\s*".join([COORD_TOKEN_PATTERN] * 4) + r"\s*"
                          + re.escape(BOX_END))

    def parse_bins(self, text: str) -> list[list[int]]:
        """Every well-formed box in ``text`` as 4 bins (bins out of range or inverted are skipped)."""
        if not isinstance(text, str):
            return []
        found = ([int(g) for g in match.groups()] for match in self.pattern.finditer(text))
        return [bins for bins in found if self.valid_bins(bins)]

    def valid_bins(self, bins) -> bool:
        """Whether 4 bins are a box this codec can write: each in 0 .. N-1, x2 >= x1 and y2 >= y1."""
        return (len(bins) == 4 and 0 <= min(bins) and max(bins) < self.num_bins
                and bins[2] >= bins[0] and bins[3] >= bins[1])

    def decode(self, text: str, image_size: tuple[int, int]) -> list[list[float]]:
        """Every well-formed box in ``text`` as original pixels (bin centres); malformed text gives ``[]``."""
        return [self.dequantize(bins, image_size) for bins in self.parse_bins(text)]

    def added_tokens(self) -> list[str]:
        """The vocabulary entries this format needs beyond the LLM's own (none for text)."""
        if self.box_format == "text":
            return []
        return [BOX_START, BOX_END] + [coord_token(i) for i in range(self.num_bins)]

    def strip_box_tokens(self, text: str) -> str:
        """``text`` with stray box-syntax tokens removed (what a person should read beside decoded boxes)."""
        stray = "|".join([re.escape(BOX_START), re.escape(BOX_END), COORD_TOKEN_PATTERN])
        return " ".join(re.sub(stray, " ", text).split())


__all__ = ["BOX_END", "BOX_FORMATS", "BOX_START", "BoxCodec", "TEXT_BOX_CLOSE", "TEXT_BOX_OPEN", "TEXT_BOX_SEPARATOR",
           "TEXT_COORD_SEPARATOR", "coord_token"]
