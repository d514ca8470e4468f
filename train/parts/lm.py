"""The small causal LM (Qwen2 architecture), trained on text only: written scenes and the region tasks asked about them.

It never sees an image. Its box tokens (``<box>``, ``</box>``, ``<coord_*>``, ordinary added tokens as a
``granvit-build`` adds them) are in its vocabulary from the start, as a grounding LLM's are (Qwen2.5-VL's
``<|box_start|>``), with the sin/cos rows GranViT gives new coordinate tokens; documents in the paper's text box format
write the same bins in digits. Quality figures: held-out perplexity, and greedy exact match on single questions about a
written scene (describe a box, find a caption), per box format: the skill the paper's frozen-LLM stage 1 relies on.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ...box_codec_granvit import BoxCodec, coord_token
from .corpus import EOS, caption_document, scene_document, single_question
from .recipe import PartsRecipe
from .training import eager_attention, publish, synth_records, train_loop, train_part_tokenizer

TASKS = ("bbox2caption", "caption2bbox")
CAPTION_DOCUMENT_SHARE = 0.1  # plain whole-image captions among the documents: text that is not a question


class Documents(torch.utils.data.Dataset):
    """Item i: a document about scene ``i % n``, a pure function of (seed, i): every visit writes the scene, its
    questions and its box format anew, and a resumed run sees what the uninterrupted one would."""

    def __init__(self, records: list[dict], recipe, tokenizer, items: int, seed: int):
        self.records, self.recipe, self.tokenizer, self.items, self.seed = records, recipe, tokenizer, items, seed
        self.formats = list(recipe.box_formats)
        self.weights = [recipe.box_formats[f] for f in self.formats]

    def __len__(self):
        return self.items

    def document(self, record: dict, rng: random.Random, box_format: str | None = None) -> list[tuple[str, str]]:
        """The scene written and asked (half of them with random captions, `random_caption_share`); `box_format`
        None: drawn by the recipe's shares."""
        box_format = box_format or rng.choices(self.formats, self.weights)[0]
        random_captions = rng.random() < self.recipe.random_caption_share
        # (drawn only when the recipe has such documents: a recipe without keeps its documents as they were)
        shuffled = (self.recipe.shuffled_words_share > 0 and not random_captions
                    and rng.random() < self.recipe.shuffled_words_share)
        return scene_document(record, BoxCodec(self.recipe.num_coord_bins, box_format), self.recipe.templates, rng,
                              random_captions=random_captions, shuffled_words=shuffled)

    def segments(self, i: int) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.seed}:{i}")
        record = self.records[i % len(self.records)]
        if rng.random() < CAPTION_DOCUMENT_SHARE:
            return caption_document(record, rng)
        return self.document(record, rng)

    def encode(self, documents: list[list[tuple[str, str]]]) -> list[tuple[list[int], list[int], list[int]]]:
        """(input ids, labels, scene mask) of each document; one tokenizer call for all their segments."""
        pieces = iter(self.tokenizer([text for doc in documents for text, _ in doc], add_special_tokens=False)["input_ids"])
        encoded = []
        for doc in documents:
            ids, labels, scene = [], [], []
            for _, role in doc:
                piece = next(pieces)
                ids += piece
                labels += piece if role == "answer" or not self.recipe.answers_only else [-100] * len(piece)
                scene += [int(role == "scene")] * len(piece)
            encoded.append((ids, labels, scene))
        return encoded

    def __getitem__(self, i):
        return self.encode([self.segments(i)])[0]

    def collate(self, items):
        length = max(len(ids) for ids, _, _ in items)
        pad = self.tokenizer.pad_token_id
        batch = {"input_ids": torch.full((len(items), length), pad, dtype=torch.long),
                 "labels": torch.full((len(items), length), -100, dtype=torch.long),
                 "attention_mask": torch.zeros((len(items), length), dtype=torch.long)}
        scene = torch.zeros((len(items), length), dtype=torch.bool)
        for k, (ids, labels, mask) in enumerate(items):
            batch["input_ids"][k, : len(ids)] = torch.tensor(ids)
            batch["labels"][k, : len(labels)] = torch.tensor(labels)
            batch["attention_mask"][k, : len(ids)] = 1
            scene[k, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        if self.recipe.scene_noise:
            batch["scene_mask"] = scene
        return batch


class DocumentBatches(torch.utils.data.Dataset):
    """Item j: a whole batch of `batch_size` documents that share their kind (whole-image captions, or scenes of one
    box format and one number of objects), a pure function of (seed, j). Drawn independently, a batch was padded to
    2.4x its tokens (text-format boxes are ~2.5x longer than 6-token ones, scenes hold 1-3 objects); grouped, a
    training step costs about half. The Trainer's batch size is then 1 batch."""

    def __init__(self, documents: Documents, batch_size: int, steps: int):
        self.documents, self.batch_size, self.steps = documents, batch_size, steps
        self.groups: dict[int, list[dict]] = {}
        for record in documents.records:
            self.groups.setdefault(len(record["regions"]), []).append(record)
        self.counts = sorted(self.groups)

    def __len__(self):
        return self.steps

    def __getitem__(self, j):
        docs = self.documents
        rng = random.Random(f"{docs.seed}:batch:{j}")
        if rng.random() < CAPTION_DOCUMENT_SHARE:
            return docs.encode([caption_document(rng.choice(docs.records), rng) for _ in range(self.batch_size)])
        box_format = rng.choices(docs.formats, docs.weights)[0]
        group = self.groups[rng.choices(self.counts, [len(self.groups[k]) for k in self.counts])[0]]
        return docs.encode([docs.document(rng.choice(group), rng, box_format) for _ in range(self.batch_size)])

    def collate(self, batches):
        return self.documents.collate([item for batch in batches for item in batch])


@torch.no_grad()
def perplexity(model, dataset: Documents, n: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n, 32):
        batch = dataset.collate([dataset[i] for i in range(start, min(n, start + 32))])
        out = model(**batch)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + out.loss.item() * tokens, count + tokens
    return math.exp(total / max(count, 1))


@torch.no_grad()
def task_exact(model, tokenizer, records: list[dict], codec: BoxCodec, templates: dict, task: str, seed: int,
               batch_size: int = 50) -> float:
    """Greedy exact match on one question per held-out scene, asked right after the written scene."""
    model.eval()
    rng = random.Random(f"{seed}:{task}:{codec.box_format}")
    questions = [single_question(r, codec, templates, task, rng) for r in records]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    hits = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        inputs = tokenizer([prompt for prompt, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(text.strip() == answer.strip() for text, (_, answer) in zip(texts, chunk))
    tokenizer.padding_side = side
    return hits / max(len(questions), 1)


def lm_scores(model, tokenizer, test: list[dict], recipe, seed: int) -> dict:
    """Held-out perplexity, and exact match per task and box format (`text_task_exact`: the worst of them)."""
    documents = Documents(test, dataclasses.replace(recipe, answers_only=False), tokenizer, len(test), seed + 1)
    scores = {"perplexity": perplexity(model, documents, len(test))}
    for box_format in recipe.box_formats:
        codec = BoxCodec(recipe.num_coord_bins, box_format)
        for task in TASKS:
            scores[f"{task}_exact_{box_format}"] = task_exact(model, tokenizer, test, codec, recipe.templates, task, seed)
    scores["text_task_exact"] = min(v for k, v in scores.items() if "_exact_" in k)
    scores["test_scenes"] = len(test)
    return scores


class SkillCurve(TrainerCallback):
    """Every tenth of the steps: greedy exact match on a few held-out scenes, first box format (the report's
    ``exact_curve``: when the LM learns to read a written scene)."""

    def __init__(self, tokenizer, records: list[dict], recipe, seed: int, log=print):
        self.tokenizer, self.records, self.recipe, self.seed, self.log = tokenizer, records, recipe, seed, log
        self.curve = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % max(1, state.max_steps // 10):
            return
        codec = BoxCodec(self.recipe.num_coord_bins, next(iter(self.recipe.box_formats)))
        with torch.autocast(model.device.type, enabled=False):
            point = {"step": state.global_step, **{task: task_exact(model, self.tokenizer, self.records, codec,
                                                                    self.recipe.templates, task, self.seed)
                                                   for task in TASKS}}
        model.train()
        self.curve.append(point)
        self.log(f"  [LM] step {point['step']}: describe exact {point['bbox2caption']:.2f}, "
                 f"find exact {point['caption2bbox']:.2f} ({len(self.records)} held-out scenes)")


def initialize_coordinate_rows(model, tokenizer, num_bins: int) -> None:
    """The sin/cos code of the bin value in the ``<coord_*>`` rows (GranViT's rule for new coordinate tokens,
    modeling_granvit.py), so neighbouring bins start similar."""
    from ...modeling_granvit import coordinate_code

    start = tokenizer.convert_tokens_to_ids(coord_token(0))
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        code = coordinate_code(num_bins, embeddings.shape[1])
        scale = embeddings[:start].float().norm(dim=1).mean() / code.norm(dim=1).mean()
        embeddings[start:start + num_bins] = (code * scale).to(embeddings)


def new_lm(recipe, tokenizer, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=max(1, recipe.hidden // 32),
        num_key_value_heads=max(1, recipe.hidden // 64), max_position_embeddings=4096,
        tie_word_embeddings=recipe.tie_word_embeddings, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if "tokens" in recipe.box_formats:
        initialize_coordinate_rows(model, tokenizer, recipe.num_coord_bins)
    return model


def pretrain_lm(parts: PartsRecipe, out: Path, work_dir: Path, progress: bool = True, log=print) -> dict:
    """Train the small LM of `parts` into the folder `out` (config, safetensors, tokenizer, part_report.json);
    checkpoints in `work_dir` make a rerun resume. Returns the report."""
    recipe, seed = parts.lm, parts.seed
    synth = parts.synth_config()
    start = time.time()
    train = synth_records(synth, seed, "train", recipe.scenes, "LM scenes", progress)
    test = synth_records(synth, seed, "test", recipe.test_scenes, "LM held-out scenes", progress)
    added = BoxCodec(recipe.num_coord_bins, "tokens").added_tokens() if "tokens" in recipe.box_formats else []
    sample = Documents(train, recipe, None, min(len(train), 3000), seed)
    texts = ["".join(text for text, _ in sample.segments(i)) for i in range(len(sample))]
    # BPE merges are learned without the box tokens, which are added whole
    tokenizer = train_part_tokenizer([BoxCodec().strip_box_tokens(t) for t in texts], recipe.vocab_size, added)
    model = new_lm(recipe, tokenizer, seed)
    if parts.bf16:
        eager_attention(model)
    dataset = DocumentBatches(Documents(train, recipe, tokenizer, 0, seed), recipe.batch_size, recipe.steps)
    skill = SkillCurve(tokenizer, test[:50], recipe, seed, log)
    history = train_loop(model, dataset, dataset.collate, name="LM", steps=recipe.steps, batch_size=1,
                         lr=recipe.learning_rate, seed=seed, bf16=parts.bf16, work_dir=work_dir, progress=progress,
                         save_every=max(50, recipe.steps // 10), log=log, callbacks=[skill], scene_noise=recipe.scene_noise,
                         stop_at=round(recipe.steps * recipe.trained_share))
    model.set_attn_implementation("sdpa")
    scores = lm_scores(model, tokenizer, test, recipe, seed)
    report = {"part": "lm", **scores, "train_scenes": len(train), "final_loss": history[-1] if history else None,
              "loss_curve": history, "exact_curve": skill.curve, "seconds": time.time() - start,
              "recipe": dataclasses.asdict(recipe)}
    tmp = out.with_name(out.name + ".tmp")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    exact = ", ".join(f"{k.replace('_exact', '')} {v:.3f}" for k, v in scores.items() if "_exact_" in k)
    log(f"  small LM: held-out perplexity {scores['perplexity']:.2f}; exact match {exact}; {report['seconds']:.0f} s")
    return publish(tmp, out, report)


__all__ = ["EOS", "lm_scores", "pretrain_lm"]
