"""The small SigLIP: vision + text towers trained with SigLIP's sigmoid image-text loss on whole-image captions.

Like the SigLIP 2 the paper starts from, it learns global image-text alignment and nothing about regions. Quality
figures: zero-shot image -> caption retrieval among held-out images, and the region probe (a linear classifier of
shape and colour on ROIAlign features of its patch grid, eval/probe.py), which says how much of *what is where* its
patches already carry before GranViT's stage 1.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import whole_image_caption
from .recipe import PartsRecipe
from .training import eager_attention, publish, synth_records, train_loop, train_part_tokenizer


def pixels(records: list[dict], image_size: int) -> torch.Tensor:
    """(n, 3, S, S) uint8: each image resized and padded exactly as GranViTImageProcessor does."""
    from ...image_processing_granvit import GranViTImageProcessor
    from ..data.schema import decode_image

    processor = GranViTImageProcessor(image_size=image_size)
    return torch.stack([(processor.pad_to_square(decode_image(r["image"]).convert("RGB")) * 255).round().to(torch.uint8)
                        for r in records])


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin/cos position code: half the channels encode the row, half the column (as in MAE)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    angles = pos[:, None] * omega[None] * (math.pi / grid) * 4  # (grid, dim/4)
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2)
    rows = one_axis[:, None].expand(grid, grid, -1)
    cols = one_axis[None, :].expand(grid, grid, -1)
    code = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)  # (grid*grid, 2*(dim/2))
    return F.pad(code, (0, dim - code.shape[1]))


class CaptionedImages(torch.utils.data.Dataset):
    """Item i: image ``i % n`` with a whole-image caption whose object order is a function of i, so every visit of an
    image reads a new order and a resumed run sees what the uninterrupted one would."""

    def __init__(self, pixels, records, tokenizer, length: int, items: int, seed: int):
        self.pixels, self.records, self.tokenizer, self.length = pixels, records, tokenizer, length
        self.items, self.seed = items, seed

    def __len__(self):
        return self.items

    def __getitem__(self, i):
        k = i % len(self.records)
        caption = whole_image_caption(self.records[k]["regions"], random.Random(f"{self.seed}:{i}"))
        return {"pixels": self.pixels[k], "caption": caption}

    def collate(self, items):
        ids = self.tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                             max_length=self.length, return_tensors="pt")["input_ids"]
        images = torch.stack([it["pixels"] for it in items]).float() / 255.0
        return {"input_ids": ids, "pixel_values": (images - 0.5) / 0.5, "return_loss": True}


@torch.no_grad()
def retrieval_accuracy(model, images: torch.Tensor, records: list[dict], tokenizer, length: int, seed: int = 0) -> float:
    """Zero-shot image -> caption retrieval: share of held-out images whose own caption scores highest among all
    held-out images' captions (chance = 1 / number of images; scenes that share a caption count as correct)."""
    model.eval()
    rng = random.Random(seed)
    captions = [whole_image_caption(r["regions"], rng) for r in records]
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    image = F.normalize(model.get_image_features(pixel_values=(images.float() / 255.0 - 0.5) / 0.5).pooler_output, dim=-1)
    best = (image @ text.T).argmax(dim=1).tolist()
    # a scene's objects in another order describe the same scene: compare sets of object names
    names = [sorted(r["caption"] for r in rec["regions"]) for rec in records]
    return sum(names[b] == names[i] for i, b in enumerate(best)) / len(records)


def new_siglip(recipe, tokenizer, seed: int):
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=max(1, recipe.hidden // 64), image_size=recipe.image_size, patch_size=recipe.patch_size,
    )
    # The text tower's special ids are the part tokenizer's (CLIP's defaults lie outside this small vocabulary).
    text = SiglipTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=max(1, recipe.text_hidden // 64),
        max_position_embeddings=recipe.text_length, projection_size=recipe.hidden, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():  # the SigLIP paper's start: temperature 10, bias -10 (most pairs are negatives)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
        # A 2-D sin/cos code in the position table: every patch says where it is from step 0 (MAE, ViT-22B).
        positions = model.vision_model.embeddings.position_embedding
        code = sincos_2d(recipe.image_size // recipe.patch_size, positions.weight.shape[1])
        positions.weight.copy_(code * positions.weight.std() / code.std())
    return model


def pretrain_siglip(parts: PartsRecipe, out: Path, work_dir: Path, progress: bool = True, log=print) -> dict:
    """Train the small SigLIP of `parts` into the folder `out` (config, safetensors, tokenizer, image processor,
    part_report.json); checkpoints in `work_dir` make a rerun resume. Returns the report."""
    from transformers import SiglipImageProcessor

    recipe, seed = parts.siglip, parts.seed
    synth = dataclasses.replace(parts.synth_config(), image_size=recipe.image_size)
    start = time.time()
    train = synth_records(synth, seed, "train", recipe.images, "SigLIP images", progress)
    test = synth_records(synth, seed, "test", recipe.test_images, "SigLIP held-out", progress)
    rng = random.Random(seed)
    tokenizer = train_part_tokenizer([whole_image_caption(r["regions"], rng) for r in train], 512)
    model = eager_attention(new_siglip(recipe, tokenizer, seed)) if parts.bf16 else new_siglip(recipe, tokenizer, seed)
    train_pixels, test_pixels = pixels(train, recipe.image_size), pixels(test, recipe.image_size)
    dataset = CaptionedImages(train_pixels, train, tokenizer, recipe.text_length, recipe.steps * recipe.batch_size, seed)
    history = train_loop(model, dataset, dataset.collate, name="SigLIP", steps=recipe.steps, batch_size=recipe.batch_size,
                         lr=recipe.learning_rate, seed=seed, bf16=parts.bf16, work_dir=work_dir, progress=progress,
                         save_every=max(50, recipe.steps // 10), log=log)
    model.set_attn_implementation("sdpa")
    accuracy = retrieval_accuracy(model, test_pixels, test, tokenizer, recipe.text_length)
    report = {
        "part": "siglip", "retrieval_top1": accuracy, "retrieval_chance": 1 / len(test), "test_images": len(test),
        "train_images": len(train), "final_loss": history[-1] if history else None, "loss_curve": history,
        "seconds": time.time() - start, "recipe": dataclasses.asdict(recipe),
    }
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    SiglipImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size},
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp)
    log(f"  small SigLIP: zero-shot retrieval {accuracy:.3f} on {len(test)} held-out images "
        f"(chance {1 / len(test):.3f}), {report['seconds']:.0f} s")
    return publish(tmp, out, report)
