"""The synthetic Gran set: the embedded default data for the main job, tests, demos and experiments.

Natural-like scenes: objects of distinct shapes, colours, sizes and textures on noisy or graded backgrounds, one
region per object. A caption names the object's attributes ("small red striped triangle"); when another object in
the scene has the same attributes, a relation to a unique object ("small red triangle left of the large blue circle")
or its position ("... on the left") makes it point at one box, so the caption is never answerable from the whole
image alone. OCR-like pages: words and lines in DejaVu fonts (shipped with matplotlib), one region per word and per
line, caption = the text.

`draw_scene`, `draw_page` and `draw_sign_scene` (a scene with small text signs next to objects, used only by the
downstream benchmarks) return the scene graph with the image: objects with their attributes and boxes, lines of
words with their boxes, signs with their word and object. `downstream.py` asks its questions about it.

Every image is a pure function of (seed, split, index), so any shard can be regenerated alone (parallel, resume).
Run `granvit-data synth --help`; `bench/data_bench.py` records the generation speed.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from ...console import UserError
from ...gran_format import COLOURS, SHAPES  # the caption vocabulary, which eval/probe.py reads back
from ..fields import typed
from .schema import DEFAULT_ROW_GROUP_SIZE, DEFAULT_SHARD_BYTES, bump, write_dataset_card, write_split

TEXTURES = ("solid", "striped", "dotted")
SIZE_WORDS = {1: ("",), 2: ("small", "large"), 3: ("small", "medium", "large")}
SPLITS = ("train", "val", "test")  # the split index is part of every image's seed: splits never share an image
RELATIONS = ("left of", "right of", "above", "below")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
WORDS = (
    "the of and to in is for on with as by at from open close exit entry sale price total cash card menu "
    "coffee tea milk bread apple water street road avenue park station north south east west left right stop "
    "slow caution danger warning push pull office room floor level garden hotel bank post market shop bakery "
    "pharmacy library museum theatre cinema school hospital airport platform gate ticket daily special fresh "
    "hours monday friday sunday today welcome thank you please only no yes free parking bus train taxi"
).split()


@dataclass
class SynthConfig:
    """Generation parameters. The defaults make a varied set; `SynthConfig(**PRESETS["tiny"])` is the one the
    tiny training run can learn (fewer, larger, distinct objects)."""

    image_size: int = 256
    min_objects: int = 2
    max_objects: int = 5
    object_size: tuple[float, float] = (0.12, 0.45)  # object side, as a fraction of the image side
    num_sizes: int = 2  # size words: 1 (none), 2 (small/large) or 3 (small/medium/large); bins of object_size
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    textures: tuple[str, ...] = TEXTURES
    allow_duplicates: bool = True  # may two objects of a scene share every attribute?
    duplicate_prob: float = 0.15  # with duplicates allowed: chance a new object copies an earlier one's attributes
    relations: bool = True  # disambiguate duplicates by relation/position; else they share one caption
    max_overlap: float = 0.1  # max intersection / smaller box area between two objects
    ocr_fraction: float = 0.2
    jpeg_quality: int = 90

    def __post_init__(self):
        self.object_size = tuple(self.object_size)
        self.shapes, self.colours, self.textures = tuple(self.shapes), tuple(self.colours), tuple(self.textures)
        if self.num_sizes not in SIZE_WORDS:
            raise ValueError(f"num_sizes must be 1, 2 or 3, got {self.num_sizes}")
        if not 0 < self.object_size[0] <= self.object_size[1] <= 1:
            raise ValueError(f"object_size must be 0 < min <= max <= 1, got {self.object_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS)) | (set(self.textures) - set(TEXTURES))
        if unknown:
            raise ValueError(f"unknown shapes/colours/textures: {sorted(unknown)}")
        combos = len(self.shapes) * len(self.colours) * len(self.textures) * self.num_sizes
        if not self.allow_duplicates and combos < self.max_objects:
            raise ValueError(f"only {combos} distinct objects exist, fewer than max_objects={self.max_objects}")


PRESETS = {
    "default": {},
    # The tiny main job (shared/docs/calibration.md): 1-3 large, distinct, solid objects that a 16-image-token model
    # at 128 px can resolve; relational captions were never learned at that scale, so no twins.
    "tiny": dict(
        image_size=128, min_objects=1, max_objects=3, object_size=(0.25, 0.6), num_sizes=2,
        shapes=("circle", "square", "triangle", "star"), colours=("red", "green", "blue", "yellow", "purple", "orange"),
        textures=("solid",), allow_duplicates=False, ocr_fraction=0.0,
    ),
}


def synth_config(values: dict, where: str = "data.synth", source: str = "recipe") -> SynthConfig:
    """The SynthConfig of a recipe's settings: a preset (PRESETS, default "default") and fields over it; an unknown
    key, a wrong type or an impossible combination is a one-line UserError naming `where`."""
    values = dict(values or {})
    preset = values.pop("preset", "default")
    if preset not in PRESETS:
        raise UserError(f"{source}: {where}.preset must be one of {sorted(PRESETS)}, not {preset!r}")
    return typed(SynthConfig, {**PRESETS[preset], **values}, where, source)


# ----------------------------------------------------------------------------------------------- drawing
def _shape_points(shape: str, s: float) -> list[tuple[float, float]] | None:
    """Polygon of `shape` inside an s x s square at the origin (None: an ellipse filling the square)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(0, 0), (s, 0), (s, s), (0, s)]
    if shape == "triangle":
        return [(s / 2, 0), (s, s), (0, s)]
    if shape == "diamond":
        return [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    if shape == "hexagon":
        return [(s / 2 + s / 2 * math.cos(a), s / 2 + s / 2 * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    if shape == "cross":
        a, b = s / 3, 2 * s / 3
        return [(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        return [
            (s / 2 + (s / 2 if k % 2 == 0 else s / 5) * math.sin(k * math.pi / 5),
             s / 2 - (s / 2 if k % 2 == 0 else s / 5) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=64)
def _shape_mask(shape: str, s: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """("L" mask of the shape in an s x s tile, tight ink box (x1, y1, x2, y2) inside the tile); cached by size."""
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    points = _shape_points(shape, s - 1)
    if points is None:
        draw.ellipse((0, 0, s - 1, s - 1), fill=255)
    else:
        draw.polygon(points, fill=255)
    return mask, mask.getbbox()


def _texture_tile(colour, texture: str, s: int, rng) -> Image.Image | tuple:
    """The fill for one object: a plain colour, or an s x s RGB tile with stripes or dots in a dark shade."""
    if texture == "solid":
        return colour
    period = max(4, s // 6)
    yy, xx = np.mgrid[0:s, 0:s]
    if texture == "striped":  # diagonal bands, half the period wide
        on = ((xx + yy + int(rng.integers(period))) % period) < period // 2
    else:  # dots on a grid
        c = period // 2
        on = ((xx % period - c) ** 2 + (yy % period - c) ** 2) <= (period / 4) ** 2
    tile = np.empty((s, s, 3), np.uint8)
    tile[:] = colour
    tile[on] = (np.asarray(colour) * 0.35).astype(np.uint8)  # dark shade keeps the hue readable
    return Image.fromarray(tile)


@functools.lru_cache(maxsize=16)
def _noise_field(size: int, sigma: int) -> Image.Image:
    """A fixed 2*size grey noise field around 128; each image crops it at a random offset: far cheaper than drawing
    fresh per-pixel noise for every image (BENCHMARKS.md, data layer), and the seed still fixes every pixel."""
    rng = np.random.default_rng(sigma)
    arr = np.clip(128 + rng.normal(0, sigma, (2 * size, 2 * size)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")


def _background(size: int, rng, light: bool = False) -> Image.Image:
    """Muted noise over a gradient or soft blobs, so the saturated object colours stay the salient signal."""
    lo, hi = (190, 250) if light else (60, 200)
    if rng.random() < 0.5:  # a 2x2 image upsampled bilinearly is a smooth gradient between its corners
        corners = rng.uniform(lo, hi, (2, 2, 1)) + rng.uniform(-15, 15, (2, 2, 3))
    else:  # low-frequency blobs: a 4x4 random field around one tinted grey
        corners = rng.uniform(lo, hi) + rng.uniform(-15, 15, 3) + rng.uniform(-25, 25, (4, 4, 1))
    base = Image.fromarray(np.clip(corners, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BILINEAR)
    ox, oy = (int(v) for v in rng.integers(0, size, 2))
    noise = _noise_field(size, int(rng.choice((3, 6, 10)))).crop((ox, oy, ox + size, oy + size))
    return ImageChops.add(base, noise, 1.0, -128)


# ----------------------------------------------------------------------------------------------- scenes
def _overlap(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _describe(obj: dict) -> str:
    texture = "" if obj["texture"] == "solid" else obj["texture"]
    return " ".join(w for w in (obj["size"], obj["colour"], texture, obj["shape"]) if w)


def _relation_holds(rel: str, a, b) -> bool:
    """`a` <rel> `b` when a's centre lies beyond b's edge: unambiguous to a viewer, not just a pixel apart."""
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return {"left of": cx < b[0], "right of": cx > b[2], "above": cy < b[1], "below": cy > b[3]}[rel]


def _captions(objects: list[dict], relations: bool) -> list[str]:
    """One caption per object that picks it out in this scene (where possible)."""
    names = [_describe(o) for o in objects]
    captions = list(names)
    if not relations:
        return captions
    unique = [i for i, n in enumerate(names) if names.count(n) == 1]
    for i, name in enumerate(names):
        twins = [j for j, n in enumerate(names) if n == name and j != i]
        if not twins:
            continue
        box, others = objects[i]["bbox"], [objects[j]["bbox"] for j in twins]
        found = None
        for ref in unique:  # "X left of the <unique Y>", true for this X and false for its twins
            for rel in RELATIONS:
                ref_box = objects[ref]["bbox"]
                if _relation_holds(rel, box, ref_box) and not any(_relation_holds(rel, o, ref_box) for o in others):
                    found = f"{name} {rel} the {names[ref]}"
                    break
            if found:
                break
        if found is None:  # "X on the left": this X lies wholly beyond every twin on that side
            for word, beyond in (
                ("on the left", lambda o: box[2] < o[0]),
                ("on the right", lambda o: box[0] > o[2]),
                ("at the top", lambda o: box[3] < o[1]),
                ("at the bottom", lambda o: box[1] > o[3]),
            ):
                if all(beyond(o) for o in others):
                    found = f"{name} {word}"
                    break
        captions[i] = found or name  # still ambiguous: the twins share a caption (a multi-box target)
    return captions


def draw_scene(cfg: SynthConfig, rng) -> tuple[Image.Image, list[dict]]:
    """A natural-like scene and its objects: {"shape", "colour", "texture", "size" (size word), "bbox" (x1, y1, x2,
    y2 ints), "area" (ink pixels)}, in drawing order. The scene graph that `downstream.py` asks questions about."""
    size = cfg.image_size
    img = _background(size, rng)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    lo, hi = cfg.object_size
    bin_w = (hi - lo) / cfg.num_sizes
    objects, used = [], set()
    for _ in range(n * 8):  # rejection sampling; a crowded scene simply ends up with fewer objects
        if len(objects) == n:
            break
        size_idx = int(rng.integers(cfg.num_sizes))
        # sizes come from the middle of their bin so "small" and "large" never touch
        side = int(size * (lo + bin_w * (size_idx + rng.uniform(0.2, 0.8))))
        attrs = (
            cfg.shapes[int(rng.integers(len(cfg.shapes)))],
            cfg.colours[int(rng.integers(len(cfg.colours)))],
            cfg.textures[int(rng.integers(len(cfg.textures)))],
            SIZE_WORDS[cfg.num_sizes][size_idx],
        )
        if cfg.allow_duplicates and objects and rng.random() < cfg.duplicate_prob:
            # planted twins: random draws almost never repeat all four attributes, and without twins there is
            # nothing for relational captions to disambiguate
            twin = objects[int(rng.integers(len(objects)))]
            attrs = (twin["shape"], twin["colour"], twin["texture"], twin["size"])
            size_idx = SIZE_WORDS[cfg.num_sizes].index(twin["size"])
            side = int(size * (lo + bin_w * (size_idx + rng.uniform(0.2, 0.8))))
        if not cfg.allow_duplicates and attrs in used:
            continue
        x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        mask, (mx1, my1, mx2, my2) = _shape_mask(attrs[0], side)
        bbox = (x + mx1, y + my1, x + mx2, y + my2)
        if any(_overlap(bbox, o["bbox"]) > cfg.max_overlap for o in objects):
            continue
        colour = tuple(int(c) for c in np.clip(np.asarray(COLOURS[attrs[1]]) + rng.integers(-20, 21, 3), 0, 255))
        img.paste(_texture_tile(colour, attrs[2], side, rng), (x, y, x + side, y + side), mask)
        used.add(attrs)
        objects.append({"shape": attrs[0], "colour": attrs[1], "texture": attrs[2], "size": attrs[3], "bbox": bbox,
                        "area": int(np.count_nonzero(np.asarray(mask)))})
    return img, objects


def _scene(cfg: SynthConfig, rng) -> tuple[Image.Image, list[dict]]:
    img, objects = draw_scene(cfg, rng)
    captions = _captions(objects, cfg.relations)
    regions = [{"bbox": [float(v) for v in o["bbox"]], "caption": c, "kind": "natural"} for o, c in zip(objects, captions)]
    return img, regions


@functools.lru_cache(maxsize=64)
def _font(name: str, px: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # DejaVu ships inside matplotlib's data folder: no system fonts, no downloads

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), px)


def draw_page(cfg: SynthConfig, rng, max_lines: int | None = None, max_words: int = 5,
              font_px: tuple[int, int] | None = None) -> tuple[Image.Image, list[list[tuple[str, tuple]]]]:
    """An OCR-like page and its text: lines top to bottom, each [(word, (x1, y1, x2, y2) ink box), ...] left to right.
    `font_px` (min, max) defaults to 1/20 .. 1/8 of the image side; `max_lines` stops early (a short page)."""
    size = cfg.image_size
    lo, hi = font_px or (max(8, size // 20), max(9, size // 8))
    img = _background(size, rng, light=True)
    draw = ImageDraw.Draw(img)
    lines = []
    y = int(rng.integers(2, max(3, size // 10)))
    while max_lines is None or len(lines) < max_lines:
        px = int(rng.integers(lo, hi + 1))
        font = _font(FONTS[int(rng.integers(len(FONTS)))], px)
        if y + px * 1.3 > size:
            break
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        x = int(rng.integers(2, max(3, size // 8)))
        words = []
        for _ in range(int(rng.integers(1, max_words + 1))):
            word = WORDS[int(rng.integers(len(WORDS)))] if rng.random() < 0.85 else f"{int(rng.integers(1, 999))}"
            box = draw.textbbox((x, y), word, font=font)
            if box[2] >= size - 1:
                break
            draw.text((x, y), word, font=font, fill=ink)
            words.append((word, box))
            x = box[2] + font.getlength(" ")
        if words:
            lines.append(words)
        y += int(px * rng.uniform(1.4, 2.2))
    return img, lines


def _ocr_page(cfg: SynthConfig, rng) -> tuple[Image.Image, list[dict]]:
    img, lines = draw_page(cfg, rng)
    regions = []
    for words in lines:  # one region per word, and one per line of two or more words
        regions += [{"bbox": [float(v) for v in box], "caption": word, "kind": "ocr"} for word, box in words]
        if len(words) > 1:
            boxes = [box for _, box in words]
            line = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            regions.append({"bbox": [float(v) for v in line], "caption": " ".join(w for w, _ in words), "kind": "ocr"})
    return img, regions


SIGN_WORDS = tuple(w for w in WORDS if len(w) >= 4)  # sign text: whole words, none of the short function words


def _gap(a, b) -> float:
    """Distance between two xyxy boxes (0 when they touch or overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return math.hypot(dx, dy)


def draw_sign_scene(cfg: SynthConfig, rng, num_signs: int = 2, font_px: int | None = None):
    """A scene (`draw_scene`) with `num_signs` small text signs, each placed right next to a different object: a light
    rectangle holding one word. A sign is "next to" its object when it sits `size // 32` px from it and every other
    object is at least `size // 8` px away, so "the sign next to the red circle" names one sign. Not part of the
    Gran presets: `downstream.py` asks about these scenes.

    Returns (image, objects, signs); a sign is {"word", "bbox" (the rectangle), "text_bbox" (the word's ink),
    "anchor" (index into objects)}. Fewer signs than asked come back when the scene leaves no room (callers redraw).
    """
    size = cfg.image_size
    img, objects = draw_scene(cfg, rng)
    draw = ImageDraw.Draw(img)
    px = font_px or max(8, size // 9)
    gap, clear, pad = max(2, size // 32), size // 8, max(2, px // 4)
    signs = []
    for anchor in (int(i) for i in rng.permutation(len(objects))):
        if len(signs) == num_signs:
            break
        word = SIGN_WORDS[int(rng.integers(len(SIGN_WORDS)))]
        if any(s["word"] == word for s in signs):
            continue
        font = _font(FONTS[int(rng.integers(len(FONTS)))], px)
        l, t, r, b = draw.textbbox((0, 0), word, font=font)
        w, h = r - l + 2 * pad, b - t + 2 * pad
        ax1, ay1, ax2, ay2 = objects[anchor]["bbox"]
        cx, cy = (ax1 + ax2 - w) // 2, (ay1 + ay2 - h) // 2  # the sign centred on the object's centre line
        sides = {"right": (ax2 + gap, cy), "left": (ax1 - gap - w, cy), "below": (cx, ay2 + gap), "above": (cx, ay1 - gap - h)}
        others = [o["bbox"] for k, o in enumerate(objects) if k != anchor]
        for side in (list(sides)[int(k)] for k in rng.permutation(4)):
            x, y = sides[side]
            box = (x, y, x + w, y + h)
            if x < 0 or y < 0 or box[2] > size or box[3] > size:
                continue
            if any(_gap(box, o) < clear for o in others) or any(_gap(box, s["bbox"]) < gap for s in signs):
                continue
            fill = tuple(int(v) for v in rng.integers(225, 256, 3))
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=fill, outline=(60, 60, 60))  # PIL includes the last px
            ink = tuple(int(v) for v in rng.integers(0, 60, 3))
            draw.text((x + pad - l, y + pad - t), word, font=font, fill=ink)
            text_box = draw.textbbox((x + pad - l, y + pad - t), word, font=font)
            signs.append({"word": word, "bbox": box, "text_bbox": tuple(text_box), "anchor": anchor})
            break
    return img, objects, signs


def generate_record(cfg: SynthConfig, seed: int, split: str, index: int) -> dict:
    """One Gran record (image as JPEG bytes), a pure function of (cfg, seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    ocr = rng.random() < cfg.ocr_fraction
    img, regions = (_ocr_page if ocr else _scene)(cfg, rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return {
        "image": {"bytes": buf.getvalue(), "path": None},
        "image_id": f"synth-{seed}-{split}-{index:08d}",
        "width": img.width,
        "height": img.height,
        "source": "synth",
        "kind": "ocr" if ocr else "natural",
        "regions": regions,
    }


@dataclass
class SynthProducer:
    """Shard producer for `write_split`: records [start, stop) of one split."""

    cfg: SynthConfig
    seed: int
    split: str

    def __call__(self, start: int, stop: int, counts: dict):
        for index in range(start, stop):
            record = generate_record(self.cfg, self.seed, self.split, index)
            if not record["regions"]:  # e.g. an OCR page too small for one word: counted, not written
                bump(counts, "filtered", "min_regions")
                continue
            yield record

    def plan(self) -> dict:
        return {"source": "synth", "seed": self.seed, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()}}


def write_synth(
    out_dir: str,
    sizes: dict[str, int],
    cfg: SynthConfig | None = None,
    seed: int = 0,
    num_proc: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_multiple: int = 1,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> dict:
    """Write the synthetic set ({split: num_images}) as Gran shards + card; returns counts per split."""
    cfg = cfg or SynthConfig()
    counts = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        # bytes per image from a few samples, to size the shards before writing them
        probe = [len(generate_record(cfg, seed, split, i)["image"]["bytes"]) + 200 for i in range(min(n, 8))]
        total = int(np.mean(probe) * n)
        counts[split] = write_split(
            out_dir, split, SynthProducer(cfg, seed, split), n, total, shard_bytes, shard_multiple, row_group_size, num_proc
        )
    write_dataset_card(
        out_dir,
        pretty_name="Synthetic Gran set",
        description=f"Generated by `granvit-data synth` (seed {seed}). Config: `{json.dumps(asdict(cfg))}`",
    )
    return counts
