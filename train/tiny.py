"""Tiny pretrained parts made on the spot: a BPE tokenizer trained in-process, a tiny SigLIP tower, a tiny Qwen2 LLM.

No Hub access exists on the project machines, so tests, the main job and the demo build their "pretrained" parts here
and save them as ordinary checkpoint folders; ``granvit-build`` then loads them with the same ``from_pretrained`` code
that loads ``google/siglip2-base-patch16-512`` and ``Qwen/Qwen2.5-1.5B`` for real runs.
"""

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from .build import build_granvit, save_granvit

EOS = "<|endoftext|>"

DEFAULT_CORPUS = [
    "a small red triangle left of the blue circle",
    "the large green square above a yellow star",
    "describe the region in the box",
    "what colour is the object on the right",
    "please provide the bounding box of the region this sentence describes",
    "text reads hello world 2026 granvit",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (any text round-trips; frequent words become one token)."""
    tokenizer = Tokenizer(models.BPE())
    # Every digit its own token, as in Qwen2.5's tokenizer: numbers (text-format boxes) spell out the same way
    # whatever digits surround them.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def save_tiny_parts(
    out_dir: str | Path,
    texts: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Save a tiny SigLIP vision tower and a tiny Qwen2 LLM (+ tokenizer) as checkpoint folders; returns their paths."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    vision_dir, llm_dir = out_dir / "tiny-siglip", out_dir / "tiny-qwen2"
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32),
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    SiglipVisionModel(vision_config).save_pretrained(vision_dir)

    tokenizer = train_tokenizer(texts, vocab_size)
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 4,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_hidden // 32),
        num_key_value_heads=max(1, text_hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(text_config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def build_tiny_checkpoint(
    out_dir: str | Path, num_coord_bins: int = 100, spatial_merge_size: int = 1, box_format: str = "tokens",
    max_tiles: int = 0, **parts_kwargs
) -> Path:
    """Tiny parts -> ``granvit-build`` -> a complete (untrained) GranViT checkpoint folder at ``out_dir/granvit``."""
    out_dir = Path(out_dir)
    vision_dir, llm_dir = save_tiny_parts(out_dir / "parts", **parts_kwargs)
    model, processor = build_granvit(
        str(vision_dir), str(llm_dir), num_coord_bins=num_coord_bins, spatial_merge_size=spatial_merge_size,
        box_format=box_format, max_tiles=max_tiles,
    )
    return save_granvit(model, processor, out_dir / "granvit")
