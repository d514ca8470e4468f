"""GPU figures for a realistic-size GranViT (issue 7): stage-1 training-step throughput + MFU, and dense region decoding.

On the lent GPU machine (its transformers is older than 5.24, so the 5.24 wheel travels in .whl/, an untracked folder
that the device tool copies: fill it here first with `pip download --no-deps transformers==5.24.0 -d .whl`):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-5.24.0-py3-none-any.whl \\
        && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py

Smoke test of every code path on CPU with a tiny model: ``python bench/gpu_bench.py --tiny``.

Model: random init, configs built here (no downloads): a SigLIP 2 base-512 tower (768 wide, 12 layers, 16 px patches,
512 px -> 1024 image tokens) + a Qwen2.5-0.5B-sized LLM (896 wide, 24 layers, 14 heads / 2 KV heads, vocab 152,704 =
Qwen2.5's 151,665 tokens + GranViT's 1003, padded to 64, tied embeddings). Stage-1-like step: the LLM (and its tied
head) frozen, the ViT + projector trained on Bbox2Caption batches with AdamW (fused), bf16 autocast over fp32 weights.

MFU counts the model FLOPs the step executes: trainable parts 3x forward (forward, input and weight gradients), the
frozen LLM 2x forward for its matmuls (input gradients only) and 3x for attention; attention as the full T x T
(PaLM's convention), the LM head over every position (the model computes logits for all of them). It is reported
against the card's dense bf16 peak and against an 8192^3 bf16 matmul measured in the same run.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

try:
    import granvit  # noqa: F401
except ImportError:
    # The device machine gets the repository but not the installed package: the repo root IS the package, so expose
    # it under its package name through a symlink.
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    link_dir = tempfile.mkdtemp()
    os.symlink(repo_root, os.path.join(link_dir, "granvit"))
    sys.path.insert(0, link_dir)

from region_bench import scene  # noqa: E402  (bench/ is on sys.path: this file runs as a script)
from transformers import Qwen2Config, SiglipVisionConfig  # noqa: E402

from granvit import GranViTConfig, GranViTForConditionalGeneration, GranViTImageProcessor, GranViTProcessor  # noqa: E402
from granvit.train.tiny import DEFAULT_CORPUS, train_tokenizer  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def configs(tiny: bool, bins: int, tokenizer_len: int) -> tuple[SiglipVisionConfig, Qwen2Config]:
    if tiny:
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=128, patch_size=16, vision_use_head=False)
        text = Qwen2Config(vocab_size=tokenizer_len + (-tokenizer_len) % 64, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return vision, text
    # google/siglip2-base-patch16-512 (vision part) and Qwen/Qwen2.5-0.5B, with their published shapes.
    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=512, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                vision_use_head=False)
    vocab = 151_665 + bins + 3
    text = Qwen2Config(vocab_size=vocab + (-vocab) % 64, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
                       tie_word_embeddings=True)
    return vision, text


def build(args, attn: str, device: torch.device):
    """Random-init model on ``device`` + a processor whose (small, trained-here) tokenizer ids fit its vocab."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    token_ids = GranViTProcessor.add_tokens(tokenizer, args.bins)
    vision, text = configs(args.tiny, args.bins, len(tokenizer))
    text.eos_token_id = text.pad_token_id = tokenizer.eos_token_id
    config = GranViTConfig(vision_config=vision, text_config=text, num_coord_bins=args.bins, **token_ids)
    with device:
        model = GranViTForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    model.initialize_coordinate_embeddings()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    processor = GranViTProcessor(GranViTImageProcessor(image_size=vision.image_size), tokenizer,
                                 num_image_tokens=config.num_image_tokens, num_coord_bins=args.bins)
    return model, processor


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(module: torch.nn.Module) -> int:
    """Multiply-accumulates per token of every Linear (and the patch-embedding conv, a per-patch matmul)."""
    total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Conv2d):
            total += m.weight.numel()
    return total


def step_flops(model, batch_size: int, seq: int) -> float:
    """Executed model FLOPs of one stage-1 step (see module docstring)."""
    cfg = model.config
    patches = cfg.patch_grid_size**2
    v, t = cfg.vision_config, cfg.text_config
    vit_fwd = 2 * matmul_flops(model.model.vision_tower) * patches + 4 * patches**2 * v.hidden_size * v.num_hidden_layers
    proj_fwd = 2 * matmul_flops(model.model.multi_modal_projector) * cfg.num_image_tokens
    llm_lin_fwd = 2 * matmul_flops(model.model.language_model) * seq
    attn_fwd = 4 * seq**2 * t.num_attention_heads * (t.hidden_size // t.num_attention_heads) * t.num_hidden_layers
    head_fwd = 2 * t.hidden_size * t.vocab_size * seq
    return batch_size * (3 * vit_fwd + 3 * proj_fwd + 2 * llm_lin_fwd + 3 * attn_fwd + 2 * head_fwd)


def measured_matmul_peak(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def train_throughput(args, attn: str, device, peak: float | None, matmul_peak: float | None) -> None:
    model, processor = build(args, attn, device)
    model.train()
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)  # tied to the frozen input embeddings
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    image, boxes = scene(n=args.batch)
    captions = ["a small red square", "the large green square above a yellow star on the left"]
    batch = processor(
        images=[image] * args.batch,
        text=[processor.bbox2caption_prompt(b, image.size) for b in boxes],
        targets=[processor.plain_text(captions[i % 2]) for i in range(args.batch)],
    ).to(device)
    seq = batch["input_ids"].shape[1]
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    flops = step_flops(model, args.batch, seq)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"train[{attn}]: batch {args.batch} x {seq} tokens, {sum(p.numel() for p in trainable) / 1e6:.1f}M trainable, "
          f"step {step_time * 1000:.1f} ms (median of {len(times)}), loss {loss.item():.3f}, "
          f"{flops / step_time / 1e12:.1f} TFLOP/s executed, peak memory {memory:.1f} GiB")
    print(f"RESULT gpu_stage1_samples_per_s_{attn} {args.batch / step_time:.4g}")
    print(f"RESULT gpu_stage1_tokens_per_s_{attn} {args.batch * seq / step_time:.4g}")
    if peak:
        print(f"RESULT gpu_stage1_mfu_{attn} {flops / step_time / peak:.4g}")
    if matmul_peak:
        print(f"RESULT gpu_stage1_fraction_of_matmul_peak_{attn} {flops / step_time / matmul_peak:.4g}")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def dense_speedup(args, device) -> None:
    model, processor = build(args, "sdpa", device)
    model.eval()
    image, boxes = scene(seed=1)
    prompts = [processor.bbox2caption_prompt(b, image.size) for b in boxes]
    eos = processor.tokenizer.eos_token_id

    def independent():
        out = []
        for prompt in prompts:
            batch = processor(images=[image], text=[prompt]).to(device)
            ids = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            ids = ids[0, batch["input_ids"].shape[1] :].tolist()
            out.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
        return out

    def dense():
        return model.dense_generate(processor, image, prompts, args.max_new_tokens)

    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        dense(), independent()  # warm-up
        timings = {"independent": [], "dense": []}
        for _ in range(args.reps):
            for name, fn in (("independent", independent), ("dense", dense)):
                sync(device)
                start = time.perf_counter()
                outputs = fn()
                sync(device)
                timings[name].append(time.perf_counter() - start)
                if name == "independent":
                    reference = outputs
        identical = reference == dense()
        tag = "fp32" if dtype == torch.float32 else "bf16"
        med = {k: statistics.median(v) for k, v in timings.items()}
        print(f"dense[{tag}]: 16 x generate {med['independent']:.3f} s, dense {med['dense']:.3f} s, "
              f"{args.max_new_tokens} new tokens, token-identical={identical}")
        print(f"RESULT gpu_dense_region_speedup_16_{tag} {med['independent'] / med['dense']:.4g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the code paths, no figures")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bins", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.warmup, args.steps, args.reps = 2, 1, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    matmul_peak = measured_matmul_peak(device) if device.type == "cuda" else None
    print(f"DEVICE {name}; torch {torch.__version__}; bf16 peak {peak and peak / 1e12} TFLOP/s (data sheet); "
          f"8192^3 bf16 matmul {matmul_peak and round(matmul_peak / 1e12)} TFLOP/s (measured)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32: the dense check compares exact tokens
    attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and device.type == "cuda" else [])
    if len(attns) == 1:
        print("flash_attn is not importable here: sdpa only")
    for attn in attns:
        train_throughput(args, attn, device, peak, matmul_peak)
    dense_speedup(args, device)
    print(f"gpu_bench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
