"""Images -> regions, the per-image half of `granvit-data annotate` (the run, shards and ranks: annotate.py).

read -> exact duplicate of an earlier input (content hash)? -> decode (EXIF-upright) -> the paper's image filters
-> route: OCR when the lines PP-OCR reads cover >= `ocr_coverage` of the image (or a fixed route) -> natural:
detector boxes (score threshold, box filters, class-agnostic NMS = the near-duplicate rule, `max_regions`), one
caption per box, cleaned (`annotate_models.clean_caption`); OCR: a region per line and per word with its text
(near-duplicate lines dropped) -> the box rules of filters.py, the same as `granvit-data convert`'s (the paper's for
natural regions; none for text regions unless --text-max-aspect / --text-min-box-area) -> at least `min_regions`
regions, else dropped. Every drop is counted (see annotate.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torchvision.ops import nms

from . import annotate_models as m
from .annotate_models import CROP_PROMPT, SPACE_THRESHOLD, clean_caption
from .filters import FilterConfig, box_filter_reason, image_filter_reason
from .schema import BadRecord, bump, box_reason, decode_image

logger = logging.getLogger(__name__)

IMAGE_REASONS = ("duplicate_image", "image_short_side", "image_aspect", "min_regions")  # `filtered` reasons per image


class InputError(ValueError):
    """A mistake on the command line (missing folder, unreadable list, other plan): one line, exit code 2."""


@dataclass
class AnnotateConfig:
    """Everything that decides which rows get written: saved as the plan, so a resume cannot mix settings."""

    route: str = "auto"  # auto (text coverage) | natural | ocr
    ocr_coverage: float = 0.1  # auto: OCR when recognised lines cover at least this share of the image
    detector: str | None = None
    labels: tuple[str, ...] = ()  # set: zero-shot detection with these class names
    det_threshold: float = 0.3
    nms_iou: float = 0.7  # class-agnostic NMS: a box overlapping a better one by more is a near-duplicate
    max_regions: int = 20  # per natural image, best scores first
    captioner: str = "label"  # label | a checkpoint (GranViT, Florence-2, or any image-text-to-text model)
    prompt: str = CROP_PROMPT
    max_words: int = 10
    max_new_tokens: int = 24
    ocr_engine: str = "rapidocr"  # rapidocr (embedded, CPU) | transformers (PP-OCRv5/v6, GPU)
    ocr_det_model: str = "PaddlePaddle/PP-OCRv5_server_det_safetensors"
    ocr_rec_model: str = "PaddlePaddle/PP-OCRv5_server_rec_safetensors"
    text_score: float = 0.5
    ocr_space_threshold: float = SPACE_THRESHOLD  # rapidocr: restore spaces between words (annotate_models.py; 0: off)
    filters: FilterConfig = field(default_factory=FilterConfig)  # image rules for all, box rules by region kind
    source: str = "annotate"

    def __post_init__(self):
        if self.route not in ("auto", "natural", "ocr"):
            raise InputError(f"--route must be auto, natural or ocr, not {self.route!r}")
        if self.route == "natural" and not self.detector:
            raise InputError("--route natural needs --detector (a transformers object-detection checkpoint)")
        self.labels = tuple(self.labels)


def load_models(cfg: AnnotateConfig, device=None, dtype=None, batch_size: int = 8) -> dict:
    """The detector, captioner and OCR engine the config asks for, on `device` (bf16 on GPU). A model that cannot
    be found or loaded, or a missing OCR package, is the user's to fix: an InputError naming it."""
    def load(what: str, name: str, build):
        try:
            return build()
        except (OSError, ValueError, ImportError) as e:  # not found / not that kind of model / extra not installed
            raise InputError(f"{what} {name}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e

    models = {}
    if cfg.route != "natural" and cfg.ocr_engine == "rapidocr":
        models["ocr"] = load("--ocr-engine", "rapidocr", lambda: m.RapidOCREngine(
            text_score=cfg.text_score, space_threshold=cfg.ocr_space_threshold))
    elif cfg.route != "natural":
        models["ocr"] = load("--ocr-det-model / --ocr-rec-model", f"{cfg.ocr_det_model} + {cfg.ocr_rec_model}", lambda: m.TransformersOCREngine(
            cfg.ocr_det_model, cfg.ocr_rec_model, cfg.text_score, device=device, dtype=dtype))
    if cfg.detector:
        models["detector"] = load("--detector", cfg.detector, lambda: m.Detector(
            cfg.detector, cfg.labels, cfg.det_threshold, batch_size, device, dtype))
        models["captioner"] = load("--captioner", cfg.captioner, lambda: m.load_captioner(
            cfg.captioner, cfg.max_words, cfg.max_new_tokens, batch_size, device, dtype, cfg.prompt))
    return models


# ----------------------------------------------------------------------------------------------- one batch
def run_guarded(fn, inputs: list, ids: list[str], counts: dict, reason: str) -> list:
    """fn(inputs) -> one output per input. A model error must not end a run: a failed batch is retried one input
    at a time, and each input that still fails is counted as skipped/<reason> and gets None."""
    if len(inputs) > 1:
        try:
            return fn(inputs)
        except Exception as e:  # any model, any error: find the input that causes it
            logger.warning("annotate: %s on a batch of %d (%s: %s); retrying one by one", reason, len(inputs), type(e).__name__, e)
    outputs = []
    for x, image_id in zip(inputs, ids):
        try:
            outputs.append(fn([x])[0])
        except Exception as e:
            logger.warning("annotate: %s on %s: %s: %s", reason, image_id, type(e).__name__, e)
            bump(counts, "skipped", reason)
            outputs.append(None)
    return outputs


def _nms_keep(boxes: list[list[float]], scores: list[float], iou: float) -> list[int]:
    """Indices kept by class-agnostic NMS, best score first."""
    if not boxes:
        return []
    return nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32), iou).tolist()


def text_coverage(lines, width: int, height: int) -> float:
    """Share of the image covered by recognised lines with 2+ letters or digits (a star or a stripe pattern read
    as one glyph is not text)."""
    boxes = [line.box for line in lines if sum(c.isalnum() for c in line.text) >= 2]
    area = sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes)
    return min(1.0, area / (width * height))


class Annotator:
    """Regions for a batch of decoded RGB images: route, detect + caption or read text, filter; every drop counted.
    `__call__` returns per image (kind, regions), or None for an image skipped (and counted)."""

    def __init__(self, cfg: AnnotateConfig, ocr=None, detector=None, captioner=None):
        self.cfg, self.ocr, self.detector, self.captioner = cfg, ocr, detector, captioner

    def __call__(self, ids: list[str], images: list, counts: dict) -> list[tuple[str, list[dict]] | None]:
        results: list = [None] * len(images)
        lines = [None] * len(images)
        if self.cfg.route != "natural":
            lines = run_guarded(lambda xs: [self.ocr(x) for x in xs], images, ids, counts, "ocr_error")
        natural = []
        for n, (image, found) in enumerate(zip(images, lines)):
            if self.cfg.route != "natural" and found is None:
                continue  # the OCR engine failed on it: counted
            if self.cfg.route == "ocr" or (self.cfg.route == "auto" and text_coverage(found, *image.size) >= self.cfg.ocr_coverage):
                bump(counts, "routed", "ocr")
                if found:
                    results[n] = ("ocr", self.text_regions(found, *image.size, counts))
                else:
                    bump(counts, "skipped", "no_text")
            else:
                bump(counts, "routed", "natural")
                natural.append(n)
        if natural and self.detector is None:
            bump(counts, "skipped", "no_detector", len(natural))
        elif natural:
            self.natural(natural, ids, images, counts, results)
        return results

    def natural(self, todo: list[int], ids, images, counts, results) -> None:
        detections = run_guarded(self.detector, [images[n] for n in todo], [ids[n] for n in todo], counts, "detector_error")
        requests, owners = [], []
        for n, found in zip(todo, detections):
            if found is None:
                continue
            if not found:
                bump(counts, "skipped", "no_detections")
                continue
            kept = self.select(found, *images[n].size, counts)
            if kept:
                requests.append((images[n], [d["box"] for d in kept], [d["label"] for d in kept]))
                owners.append(n)
            else:
                results[n] = ("natural", [])  # every box filtered: counted as min_regions by the producer
        captions = run_guarded(self.captioner, requests, [ids[n] for n in owners], counts, "captioner_error")
        for n, (_, boxes, _), answers in zip(owners, requests, captions):
            if answers is None:
                continue
            regions = []
            for box, answer in zip(boxes, answers):
                caption, reason = clean_caption(answer, self.cfg.max_words)
                if reason:
                    bump(counts, "filtered", reason)
                else:
                    regions.append({"bbox": box, "caption": caption, "kind": "natural"})
            results[n] = ("natural", regions)

    def valid(self, box, width: int, height: int, kind: str, counts: dict) -> list[float] | None:
        """The box clipped to the image if it is valid and passes the box rules of its kind, else None (counted)."""
        box = [min(max(float(v), 0.0), float(lim)) for v, lim in zip(box, (width, height, width, height))]
        reason = box_reason(box, width, height)
        if reason:
            bump(counts, "broken", reason)
            return None
        reason = box_filter_reason(box, self.cfg.filters, kind)
        if reason:
            bump(counts, "filtered", reason)
            return None
        return box

    def select(self, detections: list[dict], width: int, height: int, counts: dict) -> list[dict]:
        """Valid boxes that pass the box rules, near-duplicates removed by NMS, at most --max-regions."""
        valid = []
        for d in detections:
            box = self.valid(d["box"], width, height, "natural", counts)
            if box is not None:
                valid.append({**d, "box": box})
        keep = _nms_keep([d["box"] for d in valid], [d["score"] for d in valid], self.cfg.nms_iou)
        if len(keep) < len(valid):
            bump(counts, "filtered", "duplicate_box", len(valid) - len(keep))
        if self.cfg.max_regions and len(keep) > self.cfg.max_regions:
            bump(counts, "filtered", "max_regions", len(keep) - self.cfg.max_regions)
            keep = keep[: self.cfg.max_regions]
        return [valid[i] for i in keep]

    def text_regions(self, lines, width: int, height: int, counts: dict) -> list[dict]:
        """A region per line and, for lines of 2+ words, per word. Lines overlapping a more confident line beyond
        --nms-iou are near-duplicates; a one-word line is its word (one region, the detector's tighter box)."""
        keep = _nms_keep([line.box for line in lines], [line.score for line in lines], self.cfg.nms_iou)
        if len(keep) < len(lines):
            bump(counts, "filtered", "duplicate_box", len(lines) - len(keep))
        regions = []
        for line in sorted((lines[i] for i in keep), key=lambda line: (line.box[1], line.box[0])):  # reading order
            words = line.words if line.words and len(line.words) > 1 else []
            for box, text in [(line.box, line.text), *words]:
                text = " ".join(text.split())
                if not any(c.isalnum() for c in text):
                    bump(counts, "filtered", "text_not_alnum")
                    continue
                box = self.valid(box, width, height, "ocr", counts)
                if box is not None:
                    regions.append({"bbox": box, "caption": text, "kind": "ocr"})
        return regions


class AnnotateProducer:
    """Records for inputs [start, stop): read, drop duplicates / broken / filtered images, annotate in batches."""

    def __init__(self, source, annotator: Annotator, cfg: AnnotateConfig, duplicate_of: dict, batch_size: int, bar=None):
        self.source, self.annotator, self.cfg, self.duplicate_of = source, annotator, cfg, duplicate_of
        self.batch_size, self.bar = batch_size, bar

    def load(self, i: int, counts: dict):
        if i in self.duplicate_of:
            bump(counts, "filtered", "duplicate_image")
            return None
        try:
            data = self.source.read(i)
        except OSError:
            bump(counts, "broken", "missing_image")
            return None
        try:
            image = decode_image({"bytes": data, "path": None}, rgb=True)
        except BadRecord as e:
            bump(counts, "broken", e.reason)
            return None
        reason = image_filter_reason(*image.size, self.cfg.filters)
        if reason:
            bump(counts, "filtered", reason)
            return None
        return self.source.ids[i], data, image

    def __call__(self, start: int, stop: int, counts: dict):
        counts["inputs"] = counts.get("inputs", 0) + stop - start
        for lo in range(start, stop, self.batch_size):
            hi = min(stop, lo + self.batch_size)
            batch = [b for b in (self.load(i, counts) for i in range(lo, hi)) if b is not None]
            results = self.annotator([b[0] for b in batch], [b[2] for b in batch], counts) if batch else []
            for (image_id, data, image), result in zip(batch, results):
                if result is None:
                    continue
                kind, regions = result
                if len(regions) < max(self.cfg.filters.min_regions, 1):
                    bump(counts, "filtered", "min_regions")
                    continue
                bump(counts, "regions", kind, len(regions))
                yield {
                    "image": {"bytes": data, "path": None},  # the original bytes, never re-encoded
                    "image_id": image_id, "width": image.width, "height": image.height,
                    "source": self.cfg.source, "kind": kind, "regions": regions,
                }
            if self.bar is not None:
                self.bar.update(hi - lo)
