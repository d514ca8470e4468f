"""The paper's data filters, in one place for `granvit-data convert` and `granvit-data annotate`.

Images (every image, natural or text): short side > 448 px, aspect ratio in [1/3, 3]. Regions: the paper's box
rules (aspect ratio in [1/3, 3], area > 100 x 100 px) apply to *natural* regions (objects, referring expressions,
region descriptions). *Text* (OCR) regions keep their shape and size by default: a word or a line is wide and small
(a TextOCR word of 200 x 40 px breaks both rules), so the paper's rules would drop nearly every text region and,
with them, nearly every text image. `--text-max-aspect` / `--text-min-box-area` set text-specific rules when wanted.
Then at least `--min-regions` regions per image. Every rule is counted under its own reason (`box_aspect` and
`box_area` for natural regions, `text_box_aspect` and `text_box_area` for text ones) and 0 turns it off.

`box_filter_reason(bbox, filters, kind)` is the one function that decides which rules a region gets.
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import KINDS


@dataclass
class FilterConfig:
    """The paper's data filters; 0 disables a rule."""

    min_short_side: int = 448  # keep images whose short side is > this
    max_aspect: float = 3.0  # keep images and natural boxes whose aspect ratio is in [1/max_aspect, max_aspect]
    min_box_area: float = 100 * 100  # keep natural boxes whose area is > this (pixels^2)
    min_regions: int = 1  # keep images with at least this many regions left
    text_max_aspect: float = 0.0  # the aspect rule for text (OCR) boxes; 0: a text region keeps its shape
    text_min_box_area: float = 0.0  # the area rule for text boxes; 0: a text region keeps its size


def _aspect_ok(w: float, h: float, max_aspect: float) -> bool:
    return not max_aspect or (w > 0 and h > 0 and 1 / max_aspect <= w / h <= max_aspect)


def image_filter_reason(width: int, height: int, f: FilterConfig) -> str | None:
    """The image rule (`image_short_side`, `image_aspect`) that drops a width x height image, or None."""
    if f.min_short_side and min(width, height) <= f.min_short_side:
        return "image_short_side"
    if not _aspect_ok(width, height, f.max_aspect):
        return "image_aspect"
    return None


def is_text(kind) -> bool:
    """A region kind ("natural" / "ocr", or its ClassLabel index) that is text."""
    return (KINDS[kind] if isinstance(kind, int) and 0 <= kind < len(KINDS) else kind) == "ocr"


def box_filter_reason(bbox, f: FilterConfig, kind="natural") -> str | None:
    """The box rule that drops a valid xyxy box of a region of `kind`, or None: natural regions get the paper's
    rules (`box_aspect`, `box_area`), text regions the text rules (`text_box_aspect`, `text_box_area`; off by
    default)."""
    text = is_text(kind)
    max_aspect, min_area = (f.text_max_aspect, f.text_min_box_area) if text else (f.max_aspect, f.min_box_area)
    prefix = "text_" if text else ""
    x1, y1, x2, y2 = bbox
    if not _aspect_ok(x2 - x1, y2 - y1, max_aspect):
        return prefix + "box_aspect"
    if min_area and (x2 - x1) * (y2 - y1) <= min_area:
        return prefix + "box_area"
    return None


def describe_filters(f: FilterConfig) -> str:
    """The filters as one sentence (the data card says what was kept)."""
    def rule(max_aspect, min_area, what):
        parts = ([f"aspect ratio in [1/{max_aspect:g}, {max_aspect:g}]"] if max_aspect else [])
        parts += [f"area > {min_area:g} px^2"] if min_area else []
        return f"{what} with {' and '.join(parts)}" if parts else f"{what} kept whatever their shape and size"

    image = []
    if f.min_short_side:
        image.append(f"short side > {f.min_short_side} px")
    if f.max_aspect:
        image.append(f"aspect ratio in [1/{f.max_aspect:g}, {f.max_aspect:g}]")
    return (f"Filters: images with {' and '.join(image) if image else 'any size and shape'}; "
            f"{rule(f.max_aspect, f.min_box_area, 'natural regions')}; "
            f"{rule(f.text_max_aspect, f.text_min_box_area, 'text (OCR) regions')}; "
            f"at least {max(f.min_regions, 1)} region(s) per image.")


FILTER_HELP = ("the paper's box rules (--max-aspect, --min-box-area) apply to natural regions; text (OCR) regions "
               "keep their shape and size unless --text-max-aspect / --text-min-box-area are set")


def add_filter_arguments(p, text_aliases: tuple[str, ...] = ()) -> None:
    """The filter flags of `convert` and `annotate` (`text_aliases`: older spellings of the text flags)."""
    f = FilterConfig()
    group = p.add_argument_group("filters", FILTER_HELP + "; 0 turns a rule off")
    group.add_argument("--min-short-side", type=int, default=f.min_short_side, help="keep images with short side > this")
    group.add_argument("--max-aspect", type=float, default=f.max_aspect,
                       help="images and natural boxes: aspect ratio in [1/x, x]")
    group.add_argument("--min-box-area", type=float, default=f.min_box_area, help="natural boxes: area > this (px^2)")
    group.add_argument("--min-regions", type=int, default=f.min_regions, help="images: at least this many regions left")
    group.add_argument("--text-max-aspect", *[f"--{a}-max-aspect" for a in text_aliases], dest="text_max_aspect",
                       type=float, default=f.text_max_aspect, help="text boxes: aspect ratio in [1/x, x] (default off)")
    group.add_argument("--text-min-box-area", *[f"--{a}-min-box-area" for a in text_aliases], dest="text_min_box_area",
                       type=float, default=f.text_min_box_area, help="text boxes: area > this (px^2; default off)")


def filters_from_args(args) -> FilterConfig:
    return FilterConfig(args.min_short_side, args.max_aspect, args.min_box_area, args.min_regions,
                        args.text_max_aspect, args.text_min_box_area)
