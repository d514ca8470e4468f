"""Region inference on this CPU (issue 7): dense region decoding, constrained boxes, token budget, bf16 vs fp32.

    OMP_NUM_THREADS=2 python bench/region_bench.py                       # every part (~1 min idle, 6 min at load 6)
    OMP_NUM_THREADS=1 python bench/region_bench.py --threads 1           # steadier while others load the 2 cores
    OMP_NUM_THREADS=2 python bench/region_bench.py --parts dense,tokens  # some parts
    OMP_NUM_THREADS=2 python bench/region_bench.py --parts precision --vision-hidden 384 --vision-layers 6 \\
        --text-hidden 512 --text-layers 8                                 # precision at a wider model

The model is random-init and built here (no downloads); its size is printed on the MODEL line. Default: a SigLIP tower
192 wide x 4 layers at 512 px with 16 px patches (32 x 32 = 1024 image tokens, merge 1), a Qwen2 LLM 256 wide x 4
layers, 1000 coordinate bins, and a byte-level BPE tokenizer trained on digit-free text (word list + prompt templates),
so every digit is one token as in Qwen2.5's tokenizer. Every ratio is measured within one run, with the two sides
interleaved; the machine is shared, so the LOAD lines give the 1-minute load average before and after.

Parts:
    image_tokens  image tokens per 512 px image with spatial merge 1 and 2 (GranViTConfig arithmetic, issue 2)
    dense         16 boxes on one 512 px image: 16 x (processor + generate) vs one model.describe_regions call
    constraint    share of grounding answers with no parseable box, with and without BoxConstraintLogitsProcessor
    tokens        tokens per box (<box> + 4 coordinates + </box>) vs the same bins as text "[x1, y1, x2, y2]", and
                  per-query grounding latency for each length
    precision     inference and one training step: fp32 vs bf16 autocast, sdpa vs eager attention
"""

import argparse
import os
import statistics
import time

import torch
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList, Qwen2Config, SiglipVisionConfig, SuppressTokensLogitsProcessor

from granvit import GranViTConfig, GranViTForConditionalGeneration, GranViTImageProcessor, GranViTProcessor
from granvit.processing_granvit import BBOX2CAPTION_TEMPLATE, CAPTION2BBOX_TEMPLATE
from granvit.train.tiny import train_tokenizer

WORDS = (
    "a small large red green blue yellow white black triangle circle square star object picture left right above "
    "below near the of on in with region sentence describes describe box bounding coordinate please provide what "
    "colour is there man woman dog cat car tree sign text reads hello world"
).split()
NUM_QUERIES = 16


def build(args, attn_implementation: str = "sdpa") -> tuple[GranViTForConditionalGeneration, GranViTProcessor]:
    """Random-init GranViT of the requested size (seeded, so every call builds the same weights)."""
    torch.manual_seed(0)
    # A real LLM tokenizer has the prompt templates' English words as whole tokens; digits stay single tokens.
    templates = [t.replace("{box}", "").replace("{caption}", "") for t in (BBOX2CAPTION_TEMPLATE, CAPTION2BBOX_TEMPLATE)]
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + templates * 20
    tokenizer = train_tokenizer(["".join(c for c in text if not c.isdigit()) for text in corpus], vocab_size=512)
    token_ids = GranViTProcessor.add_tokens(tokenizer, args.bins)
    vision = SiglipVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_hidden // 64,
        image_size=args.image_size,
        patch_size=16,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer) + (-len(tokenizer)) % 64,
        hidden_size=args.text_hidden,
        intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_hidden // 64,
        num_key_value_heads=max(1, args.text_hidden // 256),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = GranViTConfig(vision_config=vision, text_config=text, num_coord_bins=args.bins, **token_ids)
    model = GranViTForConditionalGeneration(config).eval()
    model.initialize_coordinate_embeddings()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = GranViTProcessor(
        GranViTImageProcessor(image_size=args.image_size),
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_coord_bins=args.bins,
    )
    return model, processor


def describe(model, args) -> str:
    vision = sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6
    llm = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    return (
        f"MODEL SigLIP {args.vision_hidden}x{args.vision_layers} ({vision:.1f}M) at {args.image_size} px / 16 px patches "
        f"-> {model.config.num_image_tokens} image tokens; Qwen2 {args.text_hidden}x{args.text_layers} ({llm:.1f}M); "
        f"{args.bins} bins; vocab {model.config.text_config.vocab_size}; random init, fp32 weights"
    )


def scene(seed: int = 0, n: int = NUM_QUERIES) -> tuple[Image.Image, list[list[float]]]:
    """A 640 x 480 picture (resized to 512 px inside the processor) and ``n`` coloured boxes on it."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(n):
        x1, y1 = (torch.rand(2, generator=generator) * torch.tensor([560.0, 400.0])).tolist()
        w, h = (20 + torch.rand(2, generator=generator) * 60).tolist()
        boxes.append([round(x1, 1), round(y1, 1), round(x1 + w, 1), round(y1 + h, 1)])
        draw.rectangle(boxes[-1], fill=tuple(int(c) for c in torch.randint(0, 255, (3,), generator=generator)))
    return image, boxes


def phrases(n: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=generator).tolist()) for k in lengths]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def result(name: str, value) -> None:
    print(f"RESULT {name} {value:.4g}" if isinstance(value, float) else f"RESULT {name} {value}", flush=True)


# ---- parts ----------------------------------------------------------------------------------------------------------
def part_image_tokens(args) -> None:
    for merge in (1, 2):
        config = GranViTConfig(spatial_merge_size=merge)  # default tower: SigLIP 2 base, 512 px, 16 px patches
        result(f"image_tokens_512_merge{merge}", config.num_image_tokens)


def independent_generate(model, processor, image, prompts, max_new_tokens, logits_processor=None) -> list[list[int]]:
    """What a user does today: one processor + generate call per query."""
    answers = []
    for prompt in prompts:
        batch = processor(images=[image], text=[prompt])
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor
        )
        answers.append(out[0, batch["input_ids"].shape[1] :].tolist())
    return answers


def trim_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def part_dense(args, model, processor) -> None:
    image, boxes = scene()
    prompts = [processor.bbox2caption_prompt(box, image.size) for box in boxes]
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        timed(model.dense_generate, processor, image, prompts[:2], 2)  # warm-up (allocator, kernels)
        independent_times, dense_times = [], []
        for _ in range(args.reps):
            t, independent = timed(independent_generate, model, processor, image, prompts, args.max_new_tokens)
            independent_times.append(t)
            t, dense = timed(model.dense_generate, processor, image, prompts, args.max_new_tokens)
            dense_times.append(t)
        dense_times.append(timed(model.describe_regions, processor, image, boxes, args.max_new_tokens)[0])
    identical = [trim_at_eos(a, eos) for a in independent] == dense
    print(f"dense: 16 x generate {[round(t, 2) for t in independent_times]} s; dense {[round(t, 2) for t in dense_times]} s; "
          f"token-identical={identical}; {args.max_new_tokens} new tokens per query")
    if not identical:
        raise SystemExit("dense decoding differs from independent generate calls")
    result("dense_region_speedup_16", statistics.median(independent_times) / statistics.median(dense_times))
    result("dense_region_seconds_16", statistics.median(dense_times))
    result("independent_generate_seconds_16", statistics.median(independent_times))


def part_constraint(args, model, processor) -> None:
    image, _ = scene()
    queries = phrases(args.grounding_queries)
    with torch.no_grad():
        free = model.ground(processor, image, queries, max_new_tokens=8, constrain_boxes=False)
        constrained = model.ground(processor, image, queries, max_new_tokens=8, constrain_boxes=True)
    print(f"constraint: {len(queries)} grounding queries on the untrained model, 8 new tokens each")
    result("unparseable_rate_free", sum(not boxes for boxes in free) / len(free))
    result("unparseable_rate_constrained", sum(not boxes for boxes in constrained) / len(constrained))


def part_tokens(args, model, processor) -> None:
    image, boxes = scene()
    tokenizer = processor.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    box_tokens = [count(processor.encode_box(box, image.size)) for box in boxes]
    digit_texts = ["[{}, {}, {}, {}]".format(*processor.box_to_bins(box, image.size)) for box in boxes]
    digit_tokens = [count(text) for text in digit_texts]
    print(f"tokens: e.g. {processor.encode_box(boxes[0], image.size)} vs {digit_texts[0]!r}")
    per_box, per_box_text = statistics.mean(box_tokens), statistics.mean(digit_tokens)
    result("tokens_per_box", per_box)
    result("tokens_per_box_text_digits", per_box_text)

    # Latency of one grounding answer of each length (+ eos), eos suppressed so both decode their full length.
    prompt = [processor.caption2bbox_prompt(phrases(1)[0])]
    no_eos = LogitsProcessorList([SuppressTokensLogitsProcessor([tokenizer.eos_token_id])])
    lengths = {"box": round(per_box) + 1, "text": round(per_box_text) + 1}
    single = {name: [] for name in lengths}
    dense = {name: [] for name in lengths}
    queries = [processor.caption2bbox_prompt(p) for p in phrases(NUM_QUERIES)]
    with torch.no_grad():
        for _ in range(args.reps):
            for name, n in lengths.items():
                single[name].append(timed(independent_generate, model, processor, image, prompt, n, no_eos)[0])
                dense[name].append(timed(model.dense_generate, processor, image, queries, n, no_eos)[0] / NUM_QUERIES)
    for name, n in lengths.items():
        print(f"tokens: {name} answers ({n} tokens): one query {[round(t, 3) for t in single[name]]} s, "
              f"per query of 16 dense {[round(t, 3) for t in dense[name]]} s")
    median = statistics.median
    result("grounding_latency_ratio_vs_text", median(single["box"]) / median(single["text"]))
    result("grounding_latency_ratio_vs_text_dense16", median(dense["box"]) / median(dense["text"]))


def part_precision(args) -> None:
    image, boxes = scene()
    # bf16 = autocast over fp32 weights (what training uses); bf16w = weights cast to bf16 (inference only).
    variants = [("fp32", "sdpa"), ("fp32", "eager"), ("bf16", "sdpa"), ("bf16", "eager"), ("bf16w", "sdpa")]
    models = {attn: build(args, attn) for attn in ("sdpa", "eager")}
    processor = models["sdpa"][1]
    print(describe(models["sdpa"][0], args))
    bf16_weights = build(args, "sdpa")[0].to(torch.bfloat16)
    batch = processor(images=[image], text=[processor.bbox2caption_prompt(boxes[0], image.size)])

    def autocast(dtype):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def model_for(dtype, attn):
        return bf16_weights if dtype == "bf16w" else models[attn][0]

    # Inference: one generate call (prefill-bound) and one dense call over 16 boxes (decode-heavy).
    times = {v: {"generate": [], "dense": []} for v in variants}
    outputs, logits = {}, {}
    with torch.no_grad():
        for dtype, attn in variants:  # warm-up and outputs
            model = model_for(dtype, attn)
            with autocast(dtype):
                logits[(dtype, attn)] = model(**batch).logits[0].float()
                outputs[(dtype, attn)] = model.describe_regions(processor, image, boxes, args.max_new_tokens)
        for _ in range(args.reps):
            for dtype, attn in variants:
                model = model_for(dtype, attn)
                with autocast(dtype):
                    times[(dtype, attn)]["generate"].append(
                        timed(model.generate, **batch, max_new_tokens=args.max_new_tokens, do_sample=False)[0]
                    )
                    times[(dtype, attn)]["dense"].append(
                        timed(model.describe_regions, processor, image, boxes, args.max_new_tokens)[0]
                    )
    reference = logits[("fp32", "sdpa")]
    median = {v: {k: statistics.median(ts) for k, ts in d.items()} for v, d in times.items()}
    for v in variants:
        top1 = (logits[v].argmax(-1) == reference.argmax(-1)).float().mean().item()
        rel = ((logits[v] - reference).abs().max() / reference.abs().max()).item()
        same = sum(a == b for a, b in zip(outputs[v], outputs[("fp32", "sdpa")]))
        print(f"precision: infer {v[0]:5s} {v[1]:5s} generate {median[v]['generate']:.3f} s, dense16 "
              f"{median[v]['dense']:.3f} s | prefill top-1 agreement {top1:.3f}, max rel logit err {rel:.2e}, "
              f"greedy captions identical {same}/{len(boxes)}")
    best_fp32 = min(("sdpa", "eager"), key=lambda a: median[("fp32", a)]["generate"])
    best_bf16 = min(("sdpa", "eager"), key=lambda a: median[("bf16", a)]["generate"])
    print(f"precision: fastest fp32 = {best_fp32}, fastest bf16 = {best_bf16} (by generate latency)")
    result("cpu_bf16_infer_speedup", median[("fp32", best_fp32)]["generate"] / median[("bf16", best_bf16)]["generate"])
    result("cpu_bf16_infer_speedup_sdpa", median[("fp32", "sdpa")]["generate"] / median[("bf16", "sdpa")]["generate"])
    result("cpu_bf16_infer_speedup_eager", median[("fp32", "eager")]["generate"] / median[("bf16", "eager")]["generate"])
    result("cpu_bf16_dense_speedup_eager", median[("fp32", "eager")]["dense"] / median[("bf16", "eager")]["dense"])
    result("cpu_bf16_weights_infer_speedup_sdpa", median[("fp32", "sdpa")]["generate"] / median[("bf16w", "sdpa")]["generate"])
    result("cpu_bf16_weights_dense_speedup_sdpa", median[("fp32", "sdpa")]["dense"] / median[("bf16w", "sdpa")]["dense"])

    # Training: full fine-tuning step (forward + backward + AdamW) on a batch of 2 Bbox2Caption samples.
    train_batch = processor(
        images=[image, image],
        text=[processor.bbox2caption_prompt(b, image.size) for b in boxes[:2]],
        targets=[processor.plain_text("a red square"), processor.plain_text("the blue circle on the left")],
    )
    train_times, losses = {}, {}
    for dtype, attn in variants[:4]:
        model = build(args, attn)[0].train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps = []
        for step in range(1 + args.train_steps):  # step 0 is warm-up
            start = time.perf_counter()
            with autocast(dtype):
                loss = model(**train_batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - start)
            if step == 0:
                losses[(dtype, attn)] = loss.item()
        train_times[(dtype, attn)] = statistics.median(steps[1:])
        print(f"precision: train {dtype:4s} {attn:5s} step {train_times[(dtype, attn)]:.3f} s "
              f"(steps {[round(s, 2) for s in steps]}), first loss {losses[(dtype, attn)]:.5f}")
    result("cpu_bf16_train_speedup_sdpa", train_times[("fp32", "sdpa")] / train_times[("bf16", "sdpa")])
    result("cpu_bf16_train_speedup_eager", train_times[("fp32", "eager")] / train_times[("bf16", "eager")])
    result("cpu_bf16_train_first_loss_abs_diff", abs(losses[("bf16", "eager")] - losses[("fp32", "eager")]))


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """Threads and the sizes of `build`'s random-init model (tiling_bench.py measures the same model)."""
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--vision-hidden", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-hidden", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--bins", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=10, help="caption length in the dense part")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="image_tokens,dense,constraint,tokens,precision")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    model_arguments(parser)
    parser.add_argument("--grounding-queries", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    print(f"LOAD before {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    if "image_tokens" in parts:
        part_image_tokens(args)
    if {"dense", "constraint", "tokens"} & set(parts):
        model, processor = build(args)
        print(describe(model, args) + ", sdpa")
        if "dense" in parts:
            part_dense(args, model, processor)
        if "constraint" in parts:
            part_constraint(args, model, processor)
        if "tokens" in parts:
            part_tokens(args, model, processor)
    if "precision" in parts:
        part_precision(args)
    print(f"LOAD after {os.getloadavg()[0]:.2f}; bench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
