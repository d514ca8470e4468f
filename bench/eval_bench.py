"""Evaluation throughput: `evaluate_synthetic` and `granvit-eval` (grounding) on a tiny checkpoint.

    OMP_NUM_THREADS=1 python bench/eval_bench.py --device cpu --regions 32
    python bench/eval_bench.py --device cuda --dtype bfloat16 --regions 512 --batch-size 64

The tiny model measures the harness (prompting, batching, decoding, scoring), not a real model's speed.
Prints `RESULT <name> <value>` lines.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset

from granvit.eval.run import evaluate_synthetic, load_model, run_benchmark
from granvit.train.data.schema import GRAN_FEATURES
from granvit.train.data.synth import SynthConfig, generate_record
from granvit.train.tiny import build_tiny_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--regions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    ckpt = build_tiny_checkpoint(tmp / "ckpt")
    model, processor = load_model(str(ckpt), args.device, args.dtype)
    cfg = SynthConfig(image_size=128, min_objects=2, max_objects=4, ocr_fraction=0)
    gran = lambda split, n: Dataset.from_list(
        [generate_record(cfg, 0, split, i) for i in range(n)], features=GRAN_FEATURES)
    test = gran("test", args.regions)   # >= 2 regions per image, so `limit` is reached
    train = gran("train", 16)

    evaluate_synthetic(model, processor, test, limit=args.batch_size, batch_size=args.batch_size, train=train)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = evaluate_synthetic(model, processor, test, limit=args.regions, batch_size=args.batch_size, train=train)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tag = f"{args.device.split(':')[0]}_{args.dtype}_bs{args.batch_size}"
    # Each region is two generations (caption -> box, box -> caption).
    print(f"RESULT eval_synthetic_regions_per_s_{tag} {out['num_regions'] / dt:.1f}")
    print(json.dumps({k: v for k, v in out.items() if k != "examples"}))

    rows = []
    for i, row in enumerate(test.select(range(min(len(test), args.regions)))):
        r = row["regions"][0]
        x1, y1, x2, y2 = r["bbox"]
        rows.append({"question_id": i, "image": f"{i}.png", "answer": [r["caption"]], "bbox": [x1, y1, x2 - x1, y2 - y1]})
        row["image"].save(tmp / f"{i}.png")
    (tmp / "refcoco.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = time.perf_counter()
    scores = run_benchmark(model, processor, "refcoco_val", str(tmp / "out"), data=str(tmp / "refcoco.jsonl"),
                           batch_size=args.batch_size)
    dt = time.perf_counter() - t
    print(f"RESULT eval_refcoco_local_samples_per_s_{tag} {scores['count'] / dt:.1f}")
    print(f"RESULT eval_refcoco_local_invalid_{tag} {scores['invalid']}/{scores['count']}")


if __name__ == "__main__":
    main()
