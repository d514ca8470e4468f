"""The models of the data engine (`granvit-data annotate`): a detector, a region captioner and an OCR engine.

Each is a small class around a public API, so any checkpoint of its kind plugs in:

- `Detector`: transformers' `object-detection` pipeline (DETR family, RT-DETR, D-FINE, YOLOS, ...) or, given
  `labels`, the `zero-shot-object-detection` pipeline (OWLv2, OWL-ViT, Grounding DINO, ...). The paper's ViTDet is
  not among them: transformers has `VitDetModel` / `VitDetBackbone` only, no detection head.
- captioners, called with requests (image, boxes, detector labels) and returning one raw answer per box:
  `CropCaptioner` (any `image-text-to-text` model shown the crop, with the paper's "no more than 10 words" prompt),
  `Florence2Captioner` (`<REGION_TO_DESCRIPTION>` with the box as location tokens on the whole image),
  `GranViTCaptioner` (`describe_regions`: every box of an image from one image encode), `LabelCaptioner` (the
  detector's class name, as COCO conversion does).
- OCR engines, called with one image and returning `TextLine`s: `RapidOCREngine` (PP-OCRv4 det + rec as ONNX inside
  the `rapidocr-onnxruntime` wheel: offline, CPU; the embedded default; spaces between words restored from the
  recognizer's own frame probabilities, `restore_spaces`) and `TransformersOCREngine` (transformers'
  PP-OCRv5 / v6 det + rec models, weights from the Hub: the GPU option).

`clean_caption` is the one rule for what an answer must look like to become a region caption.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoModelForObjectDetection,
    AutoModelForTextRecognition,
    AutoProcessor,
    pipeline,
)

from ...box_codec_granvit import BoxCodec

# The paper's Bbox2Caption instruction asks for "no more than 10 words"; a captioner sees the crop, not coordinates.
CROP_PROMPT = "Describe the content of this image region in no more than {max_words} words."
CAPTION_REJECTIONS = ("caption_empty", "caption_not_text", "caption_repeated", "caption_too_long")
_MARKUP = re.compile(r"<[^<>\s]{1,40}>")  # <loc_12>, </s>, <coord_3>, <|im_end|>: tokens, not words
_REPEATED_UNIT = re.compile(r"(\S{2,}?)\1{2,}")  # "mPmPmP", "abcabcabc" inside one token


def _repeats(words: list[str], max_n: int = 4) -> bool:
    """An n-gram (n <= max_n) three times in a row, or a unit repeated 3 times inside one word: a decoding loop."""
    for n in range(1, max_n + 1):
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return True
    return any(_REPEATED_UNIT.search(w) for w in words)


def clean_caption(text: str, max_words: int = 10) -> tuple[str | None, str | None]:
    """(caption, None) for an answer usable as a region caption, else (None, reason in CAPTION_REJECTIONS).

    Markup tokens are dropped, whitespace collapsed, wrapping quotes and a final period stripped. Rejected: nothing
    left (`caption_empty`); control characters or mostly non-letters (`caption_not_text`); a decoding loop
    (`caption_repeated`); more than `max_words` words (`caption_too_long`: a cut caption would describe half a thing).
    """
    if any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") and not c.isspace() for c in text):
        return None, "caption_not_text"
    text = " ".join(_MARKUP.sub(" ", text).split()).strip(" \"'`.")
    if not text:
        return None, "caption_empty"
    visible = text.replace(" ", "")
    if sum(c.isalpha() for c in visible) < len(visible) / 2:
        return None, "caption_not_text"
    words = text.split()
    if _repeats([w.lower() for w in words]):
        return None, "caption_repeated"
    if len(words) > max_words:
        return None, "caption_too_long"
    return text, None


def _regroup(flat: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


# ----------------------------------------------------------------------------------------------- detection
class Detector:
    """Boxes from a transformers detection pipeline; `__call__(images)` -> per image [{"box", "score", "label"}]."""

    def __init__(self, model: str, labels=None, threshold: float = 0.3, batch_size: int = 8, device=None, dtype=None,
                 trust_remote_code: bool = False):
        self.labels = list(labels) if labels else None
        task = "zero-shot-object-detection" if self.labels else "object-detection"
        self.pipe = pipeline(task, model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.threshold, self.batch_size = threshold, batch_size

    def __call__(self, images: list) -> list[list[dict]]:
        inputs = [{"image": im, "candidate_labels": self.labels} for im in images] if self.labels else list(images)
        outputs = self.pipe(inputs, threshold=self.threshold, batch_size=self.batch_size)
        return [
            [{"box": [float(d["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax")], "score": float(d["score"]),
              "label": str(d["label"])} for d in detections]
            for detections in outputs
        ]


# ----------------------------------------------------------------------------------------------- captioning
class LabelCaptioner:
    """The detector's class name as the caption (no model: quick, and what COCO conversion does)."""

    def __call__(self, requests) -> list[list[str]]:
        return [list(labels) for _, _, labels in requests]


class CropCaptioner:
    """Any `image-text-to-text` model (Qwen2.5-VL, Qwen3-VL, ...) shown each region's crop with one prompt; all
    crops of all requests go through the pipeline as one batched call, greedy (a rerun gives the same captions)."""

    def __init__(self, model: str, prompt: str = CROP_PROMPT, max_words: int = 10, max_new_tokens: int = 24,
                 batch_size: int = 8, device=None, dtype=None, trust_remote_code: bool = False):
        self.pipe = pipeline("image-text-to-text", model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = self.pipe.tokenizer or getattr(self.pipe.processor, "tokenizer", None)
        if tokenizer is not None and not self.pipe.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # a decoder-only model generates after the last position: pad before
        self.prompt = prompt.format(max_words=max_words)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _generate(self, **inputs) -> list[str]:
        outputs = self.pipe(**inputs, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                            return_full_text=False, generate_kwargs={"do_sample": False})
        return [out[0]["generated_text"] if isinstance(out, list) else out["generated_text"] for out in outputs]

    def __call__(self, requests) -> list[list[str]]:
        chats = [
            [{"role": "user", "content": [{"type": "image", "image": image.crop(tuple(box))}, {"type": "text", "text": self.prompt}]}]
            for image, boxes, _ in requests
            for box in boxes
        ]
        texts = self._generate(text=chats) if chats else []
        return _regroup(texts, [len(boxes) for _, boxes, _ in requests])


class Florence2Captioner(CropCaptioner):
    """Florence-2 (transformers-native `Florence2ForConditionalGeneration`): `<REGION_TO_DESCRIPTION>` followed by
    the box as four location tokens, x and y each quantized to 1000 bins of the image, on the whole image."""

    def __call__(self, requests) -> list[list[str]]:
        images, prompts = [], []
        for image, boxes, _ in requests:
            for box in boxes:
                images.append(image)
                prompts.append("<REGION_TO_DESCRIPTION>" + florence2_location(box, image.size))
        texts = self._generate(images=images, text=prompts) if prompts else []
        return _regroup(texts, [len(boxes) for _, boxes, _ in requests])


def florence2_location(box, size) -> str:
    """`[x1, y1, x2, y2]` pixels -> `<loc_a><loc_b><loc_c><loc_d>`: Florence-2's 1000 bins, whose rule
    (Florence2PostProcessor.quantize: floor(v / size x 1000), at most 999) is GranViT's codec's."""
    return "".join(f"<loc_{b}>" for b in BoxCodec(1000).quantize(box, size))


class GranViTCaptioner:
    """A GranViT checkpoint through `describe_regions`: all boxes of an image share one image encode and prefill."""

    def __init__(self, model: str, max_new_tokens: int = 24, device=None, dtype=None):
        # importing this package registered GranViT with the Auto classes: no remote code runs
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.max_new_tokens = max_new_tokens

    def __call__(self, requests) -> list[list[str]]:
        return [
            self.model.describe_regions(self.processor, image, boxes, max_new_tokens=self.max_new_tokens) if boxes else []
            for image, boxes, _ in requests
        ]


def load_captioner(name: str, max_words: int = 10, max_new_tokens: int = 24, batch_size: int = 8, device=None,
                   dtype=None, prompt: str = CROP_PROMPT, trust_remote_code: bool = False):
    """`label`, or a checkpoint whose config picks the captioner: granvit -> describe_regions, florence2 -> region
    tokens, anything else -> the image-text-to-text pipeline on crops."""
    if name == "label":
        return LabelCaptioner()
    model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    if model_type == "granvit":
        return GranViTCaptioner(name, max_new_tokens, device, dtype)
    cls = Florence2Captioner if model_type == "florence2" else CropCaptioner
    return cls(name, prompt, max_words, max_new_tokens, batch_size, device, dtype, trust_remote_code)


# ----------------------------------------------------------------------------------------------- OCR
@dataclass
class TextLine:
    box: list[float]  # [x1, y1, x2, y2] original pixels: the axis-aligned hull of the engine's polygon
    text: str
    score: float
    words: list[tuple[list[float], str]] | None = None  # (box, text) per word, None when the engine gives none


def _hull(points, width: int, height: int) -> list[float]:
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))]


def _words(chars: list[str], char_boxes: list, width: int, height: int) -> list[tuple[list[float], str]] | None:
    """Word boxes from RapidOCR's per-character cells (`return_word_box`: one cell per character, spaces included):
    consecutive non-space characters form a word, its box the hull of their cells. None if they do not line up."""
    if not char_boxes or len(chars) != len(char_boxes):
        return None
    words, points, text = [], [], ""
    for char, cell in [*zip(chars, char_boxes), (" ", None)]:
        if char.strip():
            text += char
            points += cell
        elif text:
            words.append((_hull(points, width, height), text))
            points, text = [], ""
    return words


# The space rule. PP-OCRv4's recognizer (Chinese + English, CTC over 48-px-high line crops, one frame per 8 px of
# crop width) has a space class, but between English words it often lets the blank win ("thank bank" read as
# "thankbank") while still giving the space some probability in the blank frames between the two words. A space is
# written between two recognised characters when the space probabilities of the frames between them add up to at
# least SPACE_THRESHOLD (the expected number of space frames in that gap). Chosen on pages held out from the bench:
# this project's synthetic pages (seed 7) and an independent generator's (bench/annotate_bench.py, seed 1), 7233 gaps
# between characters: at the 1030 true spaces the sum has median 1.3 and minimum 0.029; inside words median 3e-5,
# 99.9th percentile 0.028, maximum 0.145; fewest errors (2 missed spaces, 2 false ones) for thresholds 0.058-0.063.
# The bench's own pages give the figures in BENCHMARKS.md ("Data engine"). Never between two CJK ideographs.
SPACE_THRESHOLD = 0.06


def _cjk(char: str) -> bool:
    return "\u4e00" <= char[:1] <= "\u9fff"  # the range rapidocr itself treats as Chinese when it groups words


def restore_spaces(preds: np.ndarray, characters: list[str], threshold: float = SPACE_THRESHOLD,
                   blank: int = 0) -> np.ndarray:
    """CTC frame probabilities (batch, frames, classes) -> a copy in which, for every two consecutive recognised
    characters (neither a space, nor both CJK) whose in-between blank frames give the space class a total probability
    >= `threshold`, the frame with the most space probability has the space as its best class (just above the blank,
    so the frame's confidence stays the recognizer's confidence that no character is there). Greedy CTC decoding of
    the copy then yields the text with those spaces, and rapidocr's character positions include them."""
    space = characters.index(" ")
    best = preds.argmax(axis=2)
    out = preds
    for b, row in enumerate(best):
        starts = [t for t in range(len(row)) if row[t] != blank and (t == 0 or row[t] != row[t - 1])]
        for a, c in zip(starts, starts[1:]):
            end = a
            while end + 1 < c and row[end + 1] == row[a]:
                end += 1  # the last frame of the first character's run
            gap = slice(end + 1, c)
            left, right = characters[row[a]], characters[row[c]]
            if gap.start >= c or space in (row[a], row[c]) or (_cjk(left) and _cjk(right)):
                continue
            if preds[b, gap, space].sum() >= threshold:
                if out is preds:
                    out = preds.copy()
                t = gap.start + int(preds[b, gap, space].argmax())
                out[b, t, space] = np.nextafter(out[b, t, blank], np.inf)
    return out


class SpaceRestoringDecode:
    """rapidocr's CTC decoder (`TextRecognizer.postprocess_op`) with `restore_spaces` applied to the frame
    probabilities first; everything after it (text, score, character positions, word boxes) is rapidocr's own."""

    def __init__(self, decode, threshold: float = SPACE_THRESHOLD):
        if " " not in decode.character:
            raise ImportError("this rapidocr-onnxruntime's recognizer has no space class; pin rapidocr-onnxruntime==1.4.4")
        self.decode, self.threshold = decode, threshold

    def __call__(self, preds, return_word_box: bool = False, **kwargs):
        return self.decode(restore_spaces(preds, self.decode.character, self.threshold), return_word_box, **kwargs)


class RapidOCREngine:
    """PP-OCRv4 text detection + recognition (ONNX, CPU) from the `rapidocr-onnxruntime` wheel: lines and words, with
    the spaces between words restored (`restore_spaces`; `space_threshold` 0: the recognizer's own spaces only)."""

    def __init__(self, text_score: float = 0.5, box_thresh: float = 0.5, unclip_ratio: float = 1.6, threads: int = 0,
                 space_threshold: float = SPACE_THRESHOLD):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError(
                "the embedded OCR engine needs rapidocr-onnxruntime: pip install 'granvit[annotate]'"
            ) from e
        threads = threads or torch.get_num_threads()  # set explicitly: onnxruntime's default hangs in some containers
        self.options = {"box_thresh": box_thresh, "unclip_ratio": unclip_ratio, "text_score": text_score}
        self.engine = RapidOCR(
            text_score=text_score, det_box_thresh=box_thresh, det_unclip_ratio=unclip_ratio,
            intra_op_num_threads=threads, inter_op_num_threads=1,
        )
        if space_threshold:
            recognizer = self.engine.text_rec
            recognizer.postprocess_op = SpaceRestoringDecode(recognizer.postprocess_op, space_threshold)

    def __call__(self, image) -> list[TextLine]:
        width, height = image.size
        # `return_word_box` exists only per call, and any per-call option resets box_thresh / unclip_ratio /
        # text_score to the package defaults unless they are passed too: so all of them go with every call.
        result, _ = self.engine(image.convert("RGB"), return_word_box=True, **self.options)
        lines = []
        for quad, text, score, *word_info in result or []:
            words = _words(word_info[1], word_info[0], width, height) if len(word_info) >= 2 else None
            lines.append(TextLine(_hull(quad, width, height), text, float(score), words))
        return lines


class TransformersOCREngine:
    """PP-OCRv5 / v6 text detection + recognition through transformers (e.g. `PaddlePaddle/PP-OCRv5_server_det_safetensors`
    + `PaddlePaddle/PP-OCRv5_server_rec_safetensors`), on any device, in bf16 on GPU: lines only, no word boxes."""

    def __init__(self, det_model: str, rec_model: str, text_score: float = 0.5, box_thresh: float = 0.6,
                 unclip_ratio: float = 1.5, batch_size: int = 32, device=None, dtype=None):
        self.device, self.dtype = torch.device(device or "cpu"), dtype or torch.float32
        self.det_processor = AutoImageProcessor.from_pretrained(det_model)
        self.det = AutoModelForObjectDetection.from_pretrained(det_model, dtype=self.dtype).to(self.device).eval()
        self.rec_processor = AutoImageProcessor.from_pretrained(rec_model)
        self.rec = AutoModelForTextRecognition.from_pretrained(rec_model, dtype=self.dtype).to(self.device).eval()
        self.text_score, self.box_thresh, self.unclip_ratio, self.batch_size = text_score, box_thresh, unclip_ratio, batch_size

    @torch.no_grad()
    def __call__(self, image) -> list[TextLine]:
        image = image.convert("RGB")
        width, height = image.size
        inputs = self.det_processor(images=[image], return_tensors="pt")  # + target_sizes: the original (h, w)
        outputs = self.det(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        found = self.det_processor.post_process_object_detection(
            outputs, target_sizes=inputs["target_sizes"], box_threshold=self.box_thresh, unclip_ratio=self.unclip_ratio
        )[0]
        boxes = [_hull(quad, width, height) for quad in found["boxes"].tolist()]  # (N, 4, 2) quads, original pixels
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        # The rec processor resizes a whole batch to the size of its widest crop: batch crops of similar aspect
        # (PaddleOCR's own order) so that short words are not stretched to the width of long lines.
        boxes.sort(key=lambda b: (b[2] - b[0]) / (b[3] - b[1]))
        lines = []
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            pixel_values = self.rec_processor(images=[image.crop(tuple(b)) for b in chunk], return_tensors="pt")["pixel_values"]
            texts = self.rec_processor.post_process_text_recognition(self.rec(pixel_values=pixel_values.to(self.device, self.dtype)))
            # an all-blank read has text "" and score NaN (the mean of nothing): dropped with the unsure ones
            lines += [TextLine(b, t["text"], float(t["score"])) for b, t in zip(chunk, texts) if t["text"] and t["score"] >= self.text_score]
        return sorted(lines, key=lambda line: (line.box[1], line.box[0]))  # reading order
