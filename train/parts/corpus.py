"""The embedded LM part's text: scenes written out, and the two region tasks asked about the written scene.

A pretrained LLM reads a scene described in its context from its web text; the paper's stage 1 relies on that (the
LLM is frozen, so the image tokens can only *steer* what it already does). A model this small has to be taught it, and
the measurements (EXPERIMENTS.md, section 2) say how: every object of a scene asked, both ways, and documents whose
objects carry random word strings, which only copying from the context can answer. The chat layout is exactly
GranViT's, with the written scene where a GranViT prompt puts the image tokens:

    <|user|>scene: <box>..</box> small pink hexagon; <box>..</box> large red star. describe <box>..</box><|endoftext|>
    <|assistant|>small pink hexagon<|endoftext|><|user|>find large red star<|endoftext|><|assistant|><box>..</box>...

A document is a list of (text, role) segments, role "text", "scene" (the written scene: where a GranViT prompt has
image tokens) or "answer", so the loss can be put on the answers alone and the scene's embeddings can be perturbed.
"""

from __future__ import annotations

import random

from ...box_codec_granvit import BoxCodec
from ...processing_granvit import ASSISTANT_TOKEN, USER_TOKEN
from ..data.synth import COLOURS, SHAPES, SIZE_WORDS, WORDS

EOS = "<|endoftext|>"
# Random "captions" of copy documents: words of the real captions and the OCR vocabulary, in any order and number,
# so no prior over captions can answer them.
CAPTION_WORDS = tuple(dict.fromkeys(SIZE_WORDS[3] + tuple(COLOURS) + SHAPES + tuple(WORDS)))


def whole_image_caption(regions: list[dict], rng: random.Random) -> str:
    """A global caption: every object named, in a random order, no positions ("a large red circle and a blue star")."""
    names = [r["caption"] for r in regions]
    rng.shuffle(names)
    if len(names) == 1:
        return f"a {names[0]}"
    return ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"


def random_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.choice((1, 2, 3, 3, 4))))


def written_scene(entries: list[tuple[str, str]]) -> str:
    """The scene as text, box first: ``scene: <box> caption; <box> caption. ``"""
    return "scene: " + "; ".join(f"{box} {caption}" for box, caption in entries) + ". "


def scene_entries(record: dict, codec: BoxCodec) -> list[tuple[str, str]]:
    size = (record["width"], record["height"])
    return [(codec.encode(r["bbox"], size), r["caption"]) for r in record["regions"]]


def question(task: str, box: str, caption: str, templates: dict) -> tuple[str, str]:
    """(user text, answer) of one region question."""
    if task == "bbox2caption":
        return templates["bbox2caption"].replace("{box}", box), caption
    return templates["caption2bbox"].replace("{caption}", caption), box


def scene_document(record: dict, codec: BoxCodec, templates: dict, rng: random.Random,
                   random_captions: bool = False, shuffled_words: bool = False) -> list[tuple[str, str]]:
    """The scene written out, then every object asked both ways in a random order, as chat turns. `shuffled_words`:
    the scene writes each caption's words in a random order (the questions and answers keep the caption)."""
    entries = scene_entries(record, codec)
    if random_captions:
        names: set[str] = set()
        while len(names) < len(entries):
            names.add(random_caption(rng))
        entries = [(box, name) for (box, _), name in zip(entries, names)]
    rng.shuffle(entries)
    turns = [question(task, box, caption, templates) for box, caption in entries
             for task in ("bbox2caption", "caption2bbox")]
    rng.shuffle(turns)
    if shuffled_words:
        entries = [(box, " ".join(rng.sample(caption.split(), len(caption.split())))) for box, caption in entries]
    # The scene's segment ends before the space of the first question: byte-level BPE splits there anyway, so the
    # ids equal those of the whole prompt tokenized at once (as the held-out questions are).
    segments = [(USER_TOKEN, "text"), (written_scene(entries).rstrip(" "), "scene")]
    for k, (text, answer) in enumerate(turns):
        asked = f" {text}" if k == 0 else f"{USER_TOKEN}{text}"
        segments += [(f"{asked}{EOS}{ASSISTANT_TOKEN}", "text"), (f"{answer}{EOS}", "answer")]
    return segments


def caption_document(record: dict, rng: random.Random) -> list[tuple[str, str]]:
    return [(f"{whole_image_caption(record['regions'], rng)}.{EOS}", "text")]


def single_question(record: dict, codec: BoxCodec, templates: dict, task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt up to the assistant's turn, answer): one question right after the written scene, as GranViT asks it
    with the image in place of the scene. The LM's held-out figures score these."""
    entries = scene_entries(record, codec)
    rng.shuffle(entries)
    box, caption = rng.choice(entries)
    text, answer = question(task, box, caption, templates)
    return f"{USER_TOKEN}{written_scene(entries)}{text}{EOS}{ASSISTANT_TOKEN}", answer
