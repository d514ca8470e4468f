"""Data-layer throughput on this machine (< 2 minutes):

    python bench/data_bench.py            # prints RESULT lines; --quick for a smoke run

- decode_preprocess_img_per_s: 512 px JPEGs streamed from Gran Parquet shards, decoded by datasets and preprocessed
  by GranViTImageProcessor(image_size=512), through a DataLoader with 1 and 2 workers (RESULT: the better one).
- convert_rows_per_s: `convert --from jsonl` of 512-640 px JPEGs with 5 regions each (filters on), num_proc 1 and 2.
- synth_img_per_s: synthetic Gran images (default config, 256 px, JPEG-encoded), one process.
"""
import argparse
import json
import os
import tempfile
import time

import torch

from granvit.image_processing_granvit import GranViTImageProcessor
from granvit.train.data.convert import convert
from granvit.train.data.synth import SynthConfig, generate_record, write_synth


def bench_synth(n: int) -> dict:
    out = {}
    for size in (128, 256, 512):
        cfg = SynthConfig(image_size=size)
        generate_record(cfg, 0, "train", 0)  # warm the font and noise caches
        start = time.perf_counter()
        for i in range(n):
            generate_record(cfg, 0, "train", i)
        out[size] = n / (time.perf_counter() - start)
    return out


class Preprocess:
    """DataLoader collate: decoded PIL images -> (batch, 3, 512, 512) pixel_values."""

    def __init__(self):
        self.processor = GranViTImageProcessor(image_size=512)

    def __call__(self, rows):
        return self.processor([r["image"] for r in rows])["pixel_values"]


def bench_decode(folder: str, workers: int) -> float:
    from datasets import load_dataset

    ds = load_dataset(folder, split="train", streaming=True).select_columns(["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=Preprocess(),
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    n, start = 0, None
    for i, pixel_values in enumerate(loader):
        if i == 1:  # skip the first batch: worker start-up, not throughput
            start, n = time.perf_counter(), 0
        n += pixel_values.shape[0]
    return n / (time.perf_counter() - start)


def bench_convert(tmp: str, n: int, num_proc: int) -> float:
    rows = []
    images = os.path.join(tmp, "conv_imgs")
    os.makedirs(images, exist_ok=True)
    for i in range(n):
        name = f"{i}.jpg"
        if not os.path.exists(os.path.join(images, name)):
            rec = generate_record(SynthConfig(image_size=512 + (i % 3) * 64, ocr_fraction=0), 1, "train", i)
            with open(os.path.join(images, name), "wb") as f:
                f.write(rec["image"]["bytes"])
        boxes = [[10 + 20 * k, 10 + 20 * k, 220 + 40 * k, 230 + 30 * k] for k in range(5)]
        rows.append({"image": name, "image_id": f"b{i}", "regions": [{"bbox": b, "caption": f"region {k}"} for k, b in enumerate(boxes)]})
    path = os.path.join(tmp, "rows.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    start = time.perf_counter()
    counts = convert("jsonl", [path], os.path.join(tmp, f"conv_out_{num_proc}"), images, num_proc=num_proc,
                     shard_bytes=2**20, shard_multiple=2)
    elapsed = time.perf_counter() - start
    assert counts["written"] == n, counts
    return n / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_synth, n_decode, n_convert = (50, 64, 40) if args.quick else (300, 600, 300)
    with tempfile.TemporaryDirectory() as tmp:
        synth = bench_synth(n_synth)
        for size, rate in synth.items():
            print(f"synth {size} px: {rate:.0f} img/s")

        folder = os.path.join(tmp, "decode")
        write_synth(folder, {"train": n_decode}, SynthConfig(image_size=512, ocr_fraction=0.2), seed=0,
                    shard_bytes=n_decode * 60_000 // 4, shard_multiple=4, num_proc=2)
        decode = {w: bench_decode(folder, w) for w in (1, 2)}
        for w, rate in decode.items():
            print(f"decode+preprocess 512 px, {w} DataLoader worker(s): {rate:.0f} img/s")

        conv = {p: bench_convert(tmp, n_convert, p) for p in (1, 2)}
        for p, rate in conv.items():
            print(f"convert jsonl, num_proc={p}: {rate:.0f} rows/s")

    print(f"RESULT decode_preprocess_img_per_s {max(decode.values()):.1f}")
    print(f"RESULT convert_rows_per_s {max(conv.values()):.1f}")
    print(f"RESULT synth_img_per_s {synth[256]:.1f}")


if __name__ == "__main__":
    main()
