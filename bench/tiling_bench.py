"""High-resolution tiling (issue 16): image tokens per image, time per image with / without tiling, dense regions.

    OMP_NUM_THREADS=1 python bench/tiling_bench.py --threads 1                  # every part
    OMP_NUM_THREADS=1 python bench/tiling_bench.py --threads 1 --parts tokens   # the token budget only (seconds)

The model is region_bench.py's random-init one (SigLIP 192 x 4 at 512 px, 16 px patches: 1024 image tokens per view;
Qwen2 256 x 4; 1000 bins). Tiling on and off run the *same* weights in the same process: only ``config.max_tiles`` and
the image processor change, and the two sides are interleaved, so the ratios hold on a shared machine. The default
tiling setting is ``--max-tiles 6`` (InternVL's smallest common setting; a 4:3 page gets 2 x 3 tiles).

Parts:
    tokens  the grid and the tokens one image occupies (image tokens + view markers) for a few sizes at 512 px
    time    one forward pass (prefill of a VQA prompt) on a 1024 x 768 image, tiled vs untiled
    dense   16 boxes on the 1024 x 768 image with tiling on: 16 x (processor + generate) vs one describe_regions
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from granvit import GranViTImageProcessor, GranViTProcessor
from granvit.tiling_granvit import num_views, select_tile_grid
from region_bench import build, independent_generate, model_arguments, result, scene, timed, trim_at_eos

SIZES = [(512, 512), (1024, 768), (768, 1024), (1024, 1024), (1920, 1080), (2048, 512)]
NUM_QUERIES = 16


def processors(model, processor, max_tiles: int) -> dict[str, GranViTProcessor]:
    """The untiled processor and a tiled one sharing its tokenizer."""
    ip = processor.image_processor
    tiled = GranViTProcessor(GranViTImageProcessor(image_size=ip.image_size, max_tiles=max_tiles), processor.tokenizer,
                             num_image_tokens=model.config.num_image_tokens, num_coord_bins=processor.num_coord_bins)
    return {"untiled": processor, "tiled": tiled}


def use(model, max_tiles: int):
    model.config.max_tiles = max_tiles  # the one field the model reads; the weights stay the same
    return model


def page(size=(1024, 768)):
    """region_bench's 640 x 480 scene of 16 coloured boxes, scaled to ``size``."""
    image, boxes = scene(n=NUM_QUERIES)
    sx, sy = size[0] / image.width, size[1] / image.height
    return image.resize(size), [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


def part_tokens(args, procs) -> None:
    tiled = procs["tiled"]
    image_id = tiled.image_token_id
    for width, height in SIZES:
        grid = select_tile_grid((width, height), args.max_tiles, args.image_size)
        ids = tiled.image_token_ids(grid)
        image_tokens = ids.count(image_id)
        print(f"tokens: {width} x {height}: grid {grid[0]} x {grid[1]}, {num_views(grid)} views, {image_tokens} image "
              f"tokens + {len(ids) - image_tokens} marker tokens = {len(ids)} (untiled: "
              f"{procs['untiled'].num_image_tokens})")
        if (width, height) == (1024, 768):
            result("tiling_tokens_per_image_1024px", len(ids))
            result("tiling_image_tokens_per_image_1024px", image_tokens)
            result("untiled_tokens_per_image_1024px", procs["untiled"].num_image_tokens)


def part_time(args, model, procs) -> None:
    image, _ = page()
    batches = {name: p(images=[image], text=[p.vqa_prompt("what is written on the page?")]) for name, p in procs.items()}
    tiles = {"untiled": 0, "tiled": args.max_tiles}
    times = {name: [] for name in procs}
    with torch.no_grad():
        for name in procs:  # warm-up
            use(model, tiles[name])(**batches[name])
        for _ in range(args.reps):
            for name in procs:
                start = time.perf_counter()
                batch = procs[name](images=[image], text=[procs[name].vqa_prompt("what is written on the page?")])
                use(model, tiles[name])(**batch)
                times[name].append(time.perf_counter() - start)
    for name in procs:
        print(f"time: {name} processor + forward on 1024 x 768, {batches[name]['input_ids'].shape[1]} tokens: "
              f"{[round(t, 2) for t in times[name]]} s")
    untiled, tiled = statistics.median(times["untiled"]), statistics.median(times["tiled"])
    result("tiling_seconds_per_image_1024px", tiled)
    result("untiled_seconds_per_image_1024px", untiled)
    result("tiling_time_ratio_1024px", tiled / untiled)


def part_dense(args, model, procs) -> None:
    processor = procs["tiled"]
    use(model, args.max_tiles)
    image, boxes = page()
    prompts = [processor.bbox2caption_prompt(box, image.size) for box in boxes]
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        independent_times, dense_times = [], []
        for _ in range(args.dense_reps):
            t, independent = timed(independent_generate, model, processor, image, prompts, args.max_new_tokens)
            independent_times.append(t)
            t, dense = timed(model.dense_generate, processor, image, prompts, args.max_new_tokens)
            dense_times.append(t)
    identical = [trim_at_eos(a, eos) for a in independent] == dense
    print(f"dense (tiled): 16 x generate {[round(t, 2) for t in independent_times]} s; dense "
          f"{[round(t, 2) for t in dense_times]} s; token-identical={identical}; {args.max_new_tokens} new tokens per query")
    if not identical:
        raise SystemExit("dense decoding differs from independent generate calls with tiling on")
    result("tiling_dense_region_speedup_16", statistics.median(independent_times) / statistics.median(dense_times))
    result("tiling_dense_region_seconds_16", statistics.median(dense_times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="tokens,time,dense")
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the time part (median reported)")
    parser.add_argument("--dense-reps", type=int, default=2, help="timed repetitions of the dense part")
    model_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    print(f"LOAD before {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    model, processor = build(args)
    procs = processors(model, processor, args.max_tiles)
    print(f"MODEL {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.config.num_image_tokens} "
          f"image tokens per view, max_tiles {args.max_tiles}, random init, fp32, sdpa")
    if "tokens" in parts:
        part_tokens(args, procs)
    if "time" in parts:
        part_time(args, model, procs)
    if "dense" in parts:
        part_dense(args, model, procs)
    print(f"LOAD after {os.getloadavg()[0]:.2f}; bench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
