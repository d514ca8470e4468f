"""The data engine measured: `granvit-data annotate` with the embedded PP-OCR on held-out synthetic OCR pages (the
generator knows every word's and line's box and text), and the OCR engine alone on the same pages in the same run.

    OMP_NUM_THREADS=1 python bench/annotate_bench.py --pages 50
    OMP_NUM_THREADS=1 python bench/annotate_bench.py --pages 0 \\
        --captioner-checkpoint outputs/quickstart/checkpoint --scenes outputs/quickstart/data

- annotate_ocr_line_* / annotate_ocr_word_*: precision and recall at IoU 0.5, text exact match and character error
  rate of the matched pairs (`eval.metrics.ocr_detection_scores`; lines and words split by `lines_and_words`);
  annotate_ocr_cer is the lines' character error rate.
  Below 0.8 precision or recall on clean rendered text means a bug in the box mapping.
- annotate_ocr_img_per_s: pages through `annotate` (read, hash, decode, route, OCR, regions, Parquet) per second;
  annotate_ocr_engine_img_per_s: `RapidOCREngine` alone on the decoded pages; annotate_ocr_overhead_ratio = engine
  time / annotate time (1.0 = the engine is all the cost; the engine pass runs before and after annotate and is
  averaged), and annotate_ocr_engine_share: the seconds spent inside the engine during the annotate run / its wall
  time (the same ratio, immune to load drift between passes). One engine object, warmed up first.
- with --captioner-checkpoint: a GranViT checkpoint captions the true boxes of the held-out natural scenes of
  --scenes through `GranViTCaptioner` (describe_regions) + `clean_caption`, the annotate path minus the detector:
  annotate_caption_exact (normalized exact match) and annotate_caption_rejected (share rejected by the cleanup).
"""
import argparse
import io
import os
import tempfile
import time

import torch
from PIL import Image

from granvit.eval.metrics import normalize_text
from granvit.train.data.annotate import DatasetSource, annotate
from granvit.train.data.annotate_models import GranViTCaptioner, RapidOCREngine, clean_caption
from granvit.train.data.annotate_regions import AnnotateConfig
from granvit.train.data.annotate_review import evaluate_ocr
from granvit.train.data.synth import SynthConfig, write_synth


def bench_ocr(num_pages: int, image_size: int, seed: int, work: str) -> dict:
    pages = os.path.join(work, "pages")
    write_synth(pages, {"test": num_pages}, SynthConfig(image_size=image_size, ocr_fraction=1.0), seed=seed)
    source = DatasetSource(pages, "test")
    images = [Image.open(io.BytesIO(source.read(i))).convert("RGB") for i in range(len(source))]
    engine = Timed(RapidOCREngine())
    engine(images[0])  # onnxruntime's first call is ~2x slower: warm up outside every timing

    def engine_only() -> float:
        start = time.perf_counter()
        for image in images:
            engine(image)
        return time.perf_counter() - start

    # engine alone before and after the annotate run, averaged: the load on a shared machine drifts within a run
    before = engine_only()
    out = os.path.join(work, "annotated")
    engine.seconds = 0.0
    start = time.perf_counter()
    counts = annotate(source, out, AnnotateConfig(), split="test", models={"ocr": engine})
    annotate_s = time.perf_counter() - start
    inside = engine.seconds
    engine_s = (before + engine_only()) / 2
    scores = evaluate_ocr(out, "test", pages, "test")
    print("counts:", counts)
    return {
        **{f"annotate_ocr_line_{k}": scores["line"][k] for k in ("precision", "recall", "exact")},
        "annotate_ocr_cer": scores["line"]["cer"],  # of the matched lines
        **{f"annotate_ocr_word_{k}": scores["word"][k] for k in ("precision", "recall", "exact", "cer")},
        "annotate_ocr_lines_true": scores["line"]["num_ref"],
        "annotate_ocr_img_per_s": len(images) / annotate_s,
        "annotate_ocr_engine_img_per_s": len(images) / engine_s,
        "annotate_ocr_overhead_ratio": engine_s / annotate_s,
        "annotate_ocr_engine_share": inside / annotate_s,  # the same ratio measured inside the one annotate run
    }


class Timed:
    """Wraps the OCR engine and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, image):
        start = time.perf_counter()
        try:
            return self.fn(image)
        finally:
            self.seconds += time.perf_counter() - start


def bench_captions(checkpoint: str, scenes: str, split: str, limit: int) -> dict:
    from datasets import load_dataset

    rows = [r for r in load_dataset(scenes, split=split) if r["kind"] == 0 and r["regions"]][:limit]
    captioner = GranViTCaptioner(checkpoint)
    exact = rejected = total = 0
    start = time.perf_counter()
    for row in rows:
        boxes = [r["bbox"] for r in row["regions"]]
        (answers,) = captioner([(row["image"].convert("RGB"), boxes, [])])
        for region, answer in zip(row["regions"], answers):
            caption, reason = clean_caption(answer)
            total += 1
            rejected += reason is not None
            exact += caption is not None and normalize_text(caption) == normalize_text(region["caption"])
    seconds = time.perf_counter() - start
    print(f"captions: {len(rows)} images, {total} true boxes")
    return {"annotate_caption_exact": exact / total, "annotate_caption_rejected": rejected / total,
            "annotate_caption_regions_per_s": total / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=50, help="held-out synthetic OCR pages (0: skip the OCR part)")
    p.add_argument("--image-size", type=int, default=512, help="> 448: the paper's short-side filter keeps them")
    p.add_argument("--seed", type=int, default=1234, help="not the tests' or the default synth seed: held out")
    p.add_argument("--captioner-checkpoint", help="a GranViT checkpoint to caption --scenes' true boxes")
    p.add_argument("--scenes", help="a Gran folder with natural scenes (e.g. outputs/quickstart/data)")
    p.add_argument("--scenes-split", default="test")
    p.add_argument("--scenes-limit", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as work:
        if args.pages:
            results.update(bench_ocr(args.pages, args.image_size, args.seed, work))
    if args.captioner_checkpoint:
        if not args.scenes:
            p.error("--captioner-checkpoint needs --scenes")
        results.update(bench_captions(args.captioner_checkpoint, args.scenes, args.scenes_split, args.scenes_limit))
    for name, value in results.items():
        print(f"RESULT {name} {value:.4g}" if isinstance(value, float) else f"RESULT {name} {value}")


if __name__ == "__main__":
    main()
