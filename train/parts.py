"""The embedded pretrained parts: a small SigLIP and a small causal LM, pretrained here the way the real ones are.

The paper builds GranViT from two pretrained parts, ``google/siglip2-base-patch16-512`` and ``Qwen/Qwen2.5-1.5B``.
Nothing can be downloaded on the machines this package is developed and tested on, so the embedded default recipe
pretrains small stand-ins first and then composes them with ``granvit-build``'s code path, exactly like a real build:

- vision (``pretrain_siglip``): a ``SiglipModel`` (vision + text towers) trained with SigLIP's sigmoid image-text loss
  (``return_loss=True``) on synthetic images paired with *whole-image* captions ("a large red circle and a small blue
  star"). It learns global alignment and nothing about regions, like the encoder the paper starts from. Quality
  figure: zero-shot image -> caption retrieval on held-out images.
- language (``pretrain_lm``): a ``Qwen2ForCausalLM`` trained on text only: captions, scene descriptions with each
  object's box written out in numbers, the two region tasks asked about such a *written* scene, and the chat roles.
  A real LLM knows from its web text how descriptions and coordinates relate; a model this small has to be shown.
  It never sees an image. Quality figures: held-out perplexity and text-task exact match.

Both parts draw their scenes from the synthetic generator with their own seed (``data seed + PARTS_SEED_OFFSET``), so
no image or scene of the GranViT train / val / test splits is ever seen while pretraining a part. Each part is saved
as an ordinary checkpoint folder (weights, config, tokenizer, image processor) and cached under
``$GRANVIT_CACHE/parts/<name>-<hash of its recipe>`` (default ``~/.cache/granvit``): a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data.synth import SynthConfig, generate_record

PARTS_SEED_OFFSET = 1000  # parts see scenes of seed + 1000: never an image of the GranViT splits
ROLE_TOKENS = ("<|user|>", "<|assistant|>")  # a chat model's turn markers, as Qwen2.5-Instruct has its own
# Bump when the way a part is made changes, so that cached parts of the old code are not reused.
PARTS_VERSION = 3


def cache_root() -> Path:
    return Path(os.environ.get("GRANVIT_CACHE", Path.home() / ".cache" / "granvit"))


# ============================================================================================ recipes
@dataclass
class SiglipRecipe:
    """The small SigLIP. Image size and patch size must be GranViT's (the tower is used as is)."""

    image_size: int = 128
    patch_size: int = 32
    hidden: int = 192
    layers: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_length: int = 24  # captions padded to a fixed length (SigLIP pools the last position)
    images: int = 4000  # distinct training images, each seen with its objects in a new random order every epoch
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    test_images: int = 256


@dataclass
class LMRecipe:
    """The small causal LM (Qwen2 architecture) and its text corpus."""

    hidden: int = 256
    layers: int = 4
    vocab_size: int = 512
    tie_word_embeddings: bool = True
    scenes: int = 4000  # synthetic scenes written out as text, each giving several documents
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-3
    test_scenes: int = 200


# ============================================================================================ text of a scene
def whole_image_caption(regions: list[dict], rng: random.Random) -> str:
    """A global caption: every object named, in a random order, no positions ("a large red circle and a blue star")."""
    names = [r["caption"] for r in regions]
    rng.shuffle(names)
    if len(names) == 1:
        return f"a {names[0]}"
    return ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"


def box_text(bbox, width: int, height: int, bins: int) -> str:
    """The paper's text box format (processing_granvit.py): normalized bins as ``[x1, y1, x2, y2]``."""
    sizes = (width, height, width, height)
    return "[" + ", ".join(str(min(int(v / s * bins), bins - 1)) for v, s in zip(bbox, sizes)) + "]"


def scene_documents(record: dict, bins: int, templates: dict, rng: random.Random) -> list[str]:
    """Text-only documents about one scene: its global caption, and the scene *written out* (every object with its
    box) followed by one region question and its answer, in the chat layout GranViT uses
    (``<|user|>...<eos><|assistant|>...<eos>``). A GranViT prompt puts image tokens where the written scene is."""
    w, h = record["width"], record["height"]
    regions = list(record["regions"])
    rng.shuffle(regions)
    scene = "; ".join(f"{r['caption']} {box_text(r['bbox'], w, h, bins)}" for r in regions)
    eos = "<|endoftext|>"
    asked = rng.choice(regions)
    box = box_text(asked["bbox"], w, h, bins)
    question, answer = rng.choice([(templates["bbox2caption"].replace("{box}", box), asked["caption"]),
                                   (templates["caption2bbox"].replace("{caption}", asked["caption"]), box)])
    return [f"{whole_image_caption(regions, rng)}.{eos}", f"<|user|>scene: {scene}. {question}{eos}<|assistant|>{answer}{eos}"]


def number_documents(rng: random.Random, bins: int, n: int) -> list[str]:
    """Counting runs in the coordinate range, so every number is a familiar string."""
    docs = []
    for _ in range(n):
        start = rng.randrange(bins)
        docs.append(" ".join(str(v) for v in range(start, min(bins, start + rng.randrange(4, 12)))) + "<|endoftext|>")
    return docs


# ============================================================================================ caching
def part_dir(name: str, recipe, synth: SynthConfig, extra: dict, seed: int) -> Path:
    """Cache folder of a part: a hash of everything that decides its weights."""
    key = json.dumps(
        {"version": PARTS_VERSION, "recipe": dataclasses.asdict(recipe), "synth": dataclasses.asdict(synth),
         "extra": extra, "seed": seed},
        sort_keys=True, default=list,
    )
    return cache_root() / "parts" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _cached(folder: Path) -> dict | None:
    report = folder / "part_report.json"
    return json.loads(report.read_text()) if report.is_file() else None


def _publish(tmp: Path, folder: Path, report: dict) -> dict:
    """Atomic from the reader's side: a folder with part_report.json is complete."""
    (tmp / "part_report.json").write_text(json.dumps(report, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return report


# ============================================================================================ tokenizer
def train_part_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with single-digit numbers (as Qwen2.5) and the chat role tokens."""
    from .tiny import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"extra_special_tokens": list(ROLE_TOKENS)}, replace_extra_special_tokens=False)
    return tokenizer


# ============================================================================================ SigLIP
def _synth_records(synth: SynthConfig, seed: int, split: str, n: int, desc: str, progress: bool) -> list[dict]:
    from tqdm import tqdm

    records = []
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        record = generate_record(synth, seed, split, i)
        if record["regions"]:
            records.append(record)
    return records


def _pixels(records: list[dict], image_size: int) -> torch.Tensor:
    """(n, 3, S, S) uint8: each image resized and padded exactly as GranViTImageProcessor does."""
    from ..image_processing_granvit import GranViTImageProcessor
    from .data.schema import decode_image

    processor = GranViTImageProcessor(image_size=image_size)
    return torch.stack(
        [(processor.pad_to_square(decode_image(r["image"]).convert("RGB")) * 255).round().to(torch.uint8) for r in records]
    )


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


class _CaptionedImages(torch.utils.data.Dataset):
    """Item i: image i with a whole-image caption whose object order is drawn anew on every visit."""

    def __init__(self, pixels, records, tokenizer, length: int, seed: int):
        self.pixels, self.records, self.tokenizer, self.length = pixels, records, tokenizer, length
        self.rng = random.Random(seed)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        caption = whole_image_caption(self.records[i]["regions"], self.rng)
        return {"pixels": self.pixels[i], "caption": caption}

    def collate(self, items):
        ids = self.tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                             max_length=self.length, return_tensors="pt")["input_ids"]
        pixels = torch.stack([it["pixels"] for it in items]).float() / 255.0
        return {"input_ids": ids, "pixel_values": (pixels - 0.5) / 0.5, "return_loss": True}


@torch.no_grad()
def retrieval_accuracy(model, pixels: torch.Tensor, records: list[dict], tokenizer, length: int, seed: int = 0) -> float:
    """Zero-shot image -> caption retrieval: share of held-out images whose own caption scores highest among all
    held-out images' captions (chance = 1 / number of images; scenes that share a caption count as correct)."""
    model.eval()
    rng = random.Random(seed)
    captions = [whole_image_caption(r["regions"], rng) for r in records]
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    image = F.normalize(model.get_image_features(pixel_values=(pixels.float() / 255.0 - 0.5) / 0.5).pooler_output, dim=-1)
    best = (image @ text.T).argmax(dim=1).tolist()
    # a scene's objects in another order describe the same scene: compare sets of object names
    names = [sorted(r["caption"] for r in rec["regions"]) for rec in records]
    return sum(names[b] == names[i] for i, b in enumerate(best)) / len(records)


def pretrain_siglip(recipe: SiglipRecipe, synth: SynthConfig, seed: int = 0, progress: bool = True, log=print) -> tuple[Path, dict]:
    """The small SigLIP, from the cache or trained now; returns (checkpoint folder, report)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    synth = dataclasses.replace(synth, image_size=recipe.image_size)
    folder = part_dir("siglip", recipe, synth, {}, seed)
    report = _cached(folder)
    if report:
        log(f"  small SigLIP: cached {folder}")
        return folder, report
    start = time.time()
    data_seed = seed + PARTS_SEED_OFFSET
    train = _synth_records(synth, data_seed, "train", recipe.images, "SigLIP images", progress)
    test = _synth_records(synth, data_seed, "test", recipe.test_images, "SigLIP held-out", progress)
    rng = random.Random(seed)
    tokenizer = train_part_tokenizer([whole_image_caption(r["regions"], rng) for r in train], 512)

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=max(1, recipe.hidden // 64), image_size=recipe.image_size, patch_size=recipe.patch_size,
    )
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
    with torch.no_grad():
        grid = recipe.image_size // recipe.patch_size
        code = sincos_2d(grid, positions.weight.shape[1])
        positions.weight.copy_(code * positions.weight.std() / code.std())

    train_pixels, test_pixels = _pixels(train, recipe.image_size), _pixels(test, recipe.image_size)
    dataset = _CaptionedImages(train_pixels, train, tokenizer, recipe.text_length, seed)
    history = _train(model, dataset, dataset.collate, recipe.steps, recipe.batch_size, recipe.learning_rate, seed, progress,
                     "SigLIP")
    accuracy = retrieval_accuracy(model, test_pixels, test, tokenizer, recipe.text_length)
    report = {
        "part": "siglip", "retrieval_top1": accuracy, "retrieval_chance": 1 / len(test), "test_images": len(test),
        "train_images": len(train), "final_loss": history[-1] if history else None, "loss_curve": history,
        "seconds": time.time() - start, "recipe": dataclasses.asdict(recipe),
    }
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    SiglipImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size},
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp)
    log(f"  small SigLIP: zero-shot retrieval {accuracy:.3f} on {len(test)} held-out images "
        f"(chance {1 / len(test):.3f}), {report['seconds']:.0f} s")
    return folder, _publish(tmp, folder, report)


# ============================================================================================ LM
def lm_corpus(recipe: LMRecipe, synth: SynthConfig, bins: int, templates: dict, seed: int, split: str, scenes: int,
              progress: bool) -> list[str]:
    records = _synth_records(synth, seed + PARTS_SEED_OFFSET, split, scenes, f"LM corpus ({split})", progress)
    rng = random.Random(f"{seed}:{split}")
    docs = [d for r in records for d in scene_documents(r, bins, templates, rng)]
    docs += number_documents(rng, bins, len(records))
    rng.shuffle(docs)
    return docs


class _Documents(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], pad_id: int):
        self.ids, self.pad_id = ids, pad_id

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]

    def collate(self, items):
        length = max(len(x) for x in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for k, x in enumerate(items):
            input_ids[k, : len(x)] = torch.tensor(x)
            labels[k, : len(x)] = torch.tensor(x)
            mask[k, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def lm_scores(model, tokenizer, docs: list[str], max_task_docs: int = 50) -> dict:
    """Held-out perplexity over whole documents, and greedy exact match on the text-only task documents."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(docs), 32):
        batch = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs[start:start + 32]]
        collated = _Documents(batch, tokenizer.pad_token_id).collate(batch)
        out = model(**collated)
        n = int((collated["labels"][:, 1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    tasks = [d for d in docs if "<|assistant|>" in d][:max_task_docs]
    hits = 0
    for doc in tasks:  # the question about the written scene, answered greedily
        prompt, rest = doc.split("<|assistant|>", 1)
        answer = rest.split("<|endoftext|>", 1)[0]
        ids = tokenizer(prompt + "<|assistant|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += text.strip() == answer.strip()
    return {"perplexity": math.exp(total / max(count, 1)), "text_task_exact": hits / max(len(tasks), 1),
            "text_task_docs": len(tasks)}


def pretrain_lm(recipe: LMRecipe, synth: SynthConfig, bins: int, templates: dict, seed: int = 0, progress: bool = True,
                log=print) -> tuple[Path, dict]:
    """The small causal LM, from the cache or trained now; returns (checkpoint folder, report)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    extra = {"bins": bins, "templates": templates}
    folder = part_dir("lm", recipe, synth, extra, seed)
    report = _cached(folder)
    if report:
        log(f"  small LM: cached {folder}")
        return folder, report
    start = time.time()
    train_docs = lm_corpus(recipe, synth, bins, templates, seed, "train", recipe.scenes, progress)
    test_docs = lm_corpus(recipe, synth, bins, templates, seed, "test", recipe.test_scenes, progress)
    tokenizer = train_part_tokenizer(train_docs, recipe.vocab_size)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=max(1, recipe.hidden // 32),
        num_key_value_heads=max(1, recipe.hidden // 64), max_position_embeddings=4096,
        tie_word_embeddings=recipe.tie_word_embeddings, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in train_docs]
    dataset = _Documents(ids, tokenizer.pad_token_id)
    history = _train(model, dataset, dataset.collate, recipe.steps, recipe.batch_size, recipe.learning_rate, seed, progress,
                     "LM")
    scores = lm_scores(model, tokenizer, test_docs)
    report = {"part": "lm", **scores, "train_documents": len(train_docs), "test_documents": len(test_docs),
              "final_loss": history[-1] if history else None, "loss_curve": history, "seconds": time.time() - start,
              "recipe": dataclasses.asdict(recipe)}
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    log(f"  small LM: held-out perplexity {scores['perplexity']:.2f}, text-task exact match "
        f"{scores['text_task_exact']:.3f}, {report['seconds']:.0f} s")
    return folder, _publish(tmp, folder, report)


# ============================================================================================ both parts
PRETRAIN = {"siglip": pretrain_siglip, "lm": pretrain_lm}


def cached_part(name: str, recipe, synth: SynthConfig, seed: int = 0, **extra) -> bool:
    return _cached(part_dir(name, recipe, synth if name == "lm" else dataclasses.replace(synth, image_size=recipe.image_size),
                            extra, seed)) is not None


def _pretrain_in_worker(name: str, kwargs: dict):
    torch.set_num_threads(1)
    return PRETRAIN[name](**kwargs, progress=False)


def pretrain_parts(jobs: dict[str, dict], parallel: bool = True, log=print) -> dict[str, tuple[Path, dict]]:
    """{part name: (folder, report)} for `jobs` ({name: keyword arguments of its pretrain function}). Parts not yet
    cached train in worker processes side by side when `parallel` (their progress goes to the log as one line each)."""
    todo = [name for name, kwargs in jobs.items() if not cached_part(name, **kwargs)]
    done = {}
    if parallel and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        log(f"  pretraining {' and '.join(todo)} side by side (one process each)")
        with ProcessPoolExecutor(len(todo), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_pretrain_in_worker, name, jobs[name]) for name in todo}
            done = {name: future.result() for name, future in futures.items()}
    for name, kwargs in jobs.items():
        if name not in done:
            done[name] = PRETRAIN[name](**kwargs, log=log)
    return done


# ============================================================================================ shared loop
def _train(model, dataset, collate, steps: int, batch_size: int, lr: float, seed: int, progress: bool, name: str) -> list:
    """AdamW + cosine through the Hugging Face Trainer; returns the logged training losses."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, adam_beta2=0.98, logging_steps=max(1, steps // 20),
            save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
            disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
        if not progress:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # the loss curve goes into the part's report instead
        trainer.train()
    return [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
