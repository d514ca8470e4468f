"""How long one evaluation of every synthetic downstream benchmark takes (`evaluate_downstream`), and the data speed.

    OMP_NUM_THREADS=1 python bench/downstream_bench.py --per-benchmark 50

The model is an untrained GranViT at the quickstart's sizes (128 px, 32 px patches = 16 image tokens, SigLIP 4 x 192,
Qwen2 4 x 256, 32 coordinate bins, text boxes) with a tokenizer that knows almost no OCR word: an untrained model never
stops, so every answer runs to its budget (the longest reference + 2 tokens) and OCR answers are spelled nearly byte by
byte. This is the slowest a quickstart-size model can be on these rows; a trained one stops at its eos.

`--legibility 128 256 512` also asks the embedded PP-OCR (`granvit-data annotate`'s engine, the `annotate` extra)
to read the OCR rows at those image sizes: whether the text is legible in the pixels at all, an upper bound on what a
small ViT can read from them. Prints `RESULT <name> <value>` lines.
"""
import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_dataset
from PIL import Image

from granvit.eval.downstream import evaluate_downstream
from granvit.eval.metrics import anls
from granvit.eval.run import load_model
from granvit.train.data.downstream import generate_row, write_downstream
from granvit.train.tiny import build_tiny_checkpoint


def legibility(sizes: list[int], n: int) -> None:
    """PP-OCR on whole images: the sign word found in what it reads, and the ANLS of its reading of a short page.
    Spaces are dropped on both sides: the embedded recogniser often drops them between English words."""
    from granvit.train.data.annotate_models import RapidOCREngine

    engine = RapidOCREngine(threads=1)
    for size in sizes:
        read = {}
        for bench in ("synth_ocr_sign", "synth_ocr_page"):
            rows = [generate_row(bench, 0, "test", i, size) for i in range(n)]
            read[bench] = [("".join(line.text for line in engine(Image.open(io.BytesIO(r["image"]["bytes"])))).lower(),
                            r["answer"].replace(" ", "")) for r in rows]
        sign = sum(answer in text for text, answer in read["synth_ocr_sign"]) / n
        page = sum(anls(text, [answer]) for text, answer in read["synth_ocr_page"]) / n
        print(f"RESULT ppocr_sign_word_found_{size}px {sign:.3f}")
        print(f"RESULT ppocr_page_anls_{size}px {page:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-benchmark", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--legibility", type=int, nargs="*", default=[], metavar="SIZE")
    parser.add_argument("--legibility-rows", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.legibility:
        legibility(args.legibility, args.legibility_rows)

    tmp = Path(tempfile.mkdtemp(prefix="downstream-bench-"))
    t = time.perf_counter()
    write_downstream(str(tmp / "data"), {"test": args.per_benchmark}, image_size=args.image_size)
    rows = load_dataset(str(tmp / "data"), split="test")
    print(f"RESULT downstream_rows_per_s {len(rows) / (time.perf_counter() - t):.1f}")

    ckpt = build_tiny_checkpoint(tmp / "ckpt", num_coord_bins=32, box_format="text", image_size=128, patch_size=32,
                                 vision_hidden=192, vision_layers=4, text_hidden=256, text_layers=4)
    model, processor = load_model(str(ckpt), "cpu", args.dtype)
    evaluate_downstream(model, processor, rows, limit_per_benchmark=2, batch_size=args.batch_size, progress=False)  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    result = evaluate_downstream(model, processor, rows, batch_size=args.batch_size, progress=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    for name, bench in result["benchmarks"].items():
        print(f"  {name:20s} {bench['metric']:16s} score {bench['score']:.3f} ({bench['count']} rows)")
    print(f"RESULT downstream_eval_seconds_{len(rows)}_rows {seconds:.1f}")
    print(f"RESULT downstream_eval_cpu_seconds_{len(rows)}_rows {cpu:.1f}")
    print(f"RESULT downstream_eval_rows_per_s {len(rows) / seconds:.1f}")


if __name__ == "__main__":
    main()
