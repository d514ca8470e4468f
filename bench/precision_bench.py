"""CPU inference precision on a trained checkpoint: fp32 vs bf16 weights, speed and held-out accuracy, same run.

    OMP_NUM_THREADS=1 python bench/precision_bench.py --checkpoint outputs/quickstart/checkpoint --data outputs/quickstart/data

Prints RESULT cpu_bf16_weights_eval_speedup, and the held-out scores in each precision (the accuracy check behind
the bf16 CPU default of the Space and granvit-eval).
"""

import argparse
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from granvit.eval.run import evaluate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/quickstart/checkpoint")
    parser.add_argument("--data", default="outputs/quickstart/data", help="Gran folder with a test split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    seconds, scores = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True, dtype=dtype).eval()
        evaluate_synthetic(model, processor, args.data, limit=16, batch_size=32)  # warm-up
        start = time.perf_counter()
        scores[name] = evaluate_synthetic(model, processor, args.data, batch_size=32)
        seconds[name] = time.perf_counter() - start
    for name in seconds:
        print(f"RESULT eval_seconds_{name} {seconds[name]:.2f}")
        print(f"RESULT grounding_acc50_{name} {scores[name]['grounding_acc50']:.4f}")
        print(f"RESULT caption_exact_{name} {scores[name]['caption_exact']:.4f}")
    print(f"RESULT cpu_bf16_weights_eval_speedup {seconds['fp32'] / seconds['bf16']:.3f}")


if __name__ == "__main__":
    main()
