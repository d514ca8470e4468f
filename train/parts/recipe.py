"""What decides a pretrained part's weights: its recipe, the scenes it sees, its seed, and the code version.

`train/configs/parts.yaml` holds the recipe of the shipped parts (`granvit-parts` trains from it). A GranViT recipe
with ``vision: pretrain`` / ``llm: pretrain`` carries its own ``parts:`` section instead (tests, experiments), which
defaults the scenes to the recipe's ``data.synth`` and the LM's box settings to its ``model`` section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...configuration_granvit import GranViTConfig
from ...console import UserError, load_yaml
from ..data.synth import SynthConfig, synth_config
from ..fields import apply_overrides, typed

PARTS_SEED_OFFSET = 1000  # parts see scenes of seed + 1000: never an image of the GranViT splits
# Bump when the way a part is made changes, so that parts made by the old code are neither reused nor shipped.
PARTS_VERSION = 4
PARTS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "parts.yaml"


@dataclass
class SiglipRecipe:
    """The small SigLIP (vision + text towers, sigmoid loss). Image and patch size are GranViT's: the tower is used
    as is."""

    image_size: int = 128
    patch_size: int = 32
    hidden: int = 192
    layers: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_length: int = 24  # captions padded to a fixed length (SigLIP pools the last position)
    images: int = 4000  # distinct training images; each visit draws the caption's object order anew
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    test_images: int = 256  # zero-shot retrieval is scored among these
    probe_images: int = 600  # region probe: fit on this many training scenes' regions, scored on test_images'


@dataclass
class LMRecipe:
    """The small causal LM (Qwen2 architecture) and its text corpus (train/parts/corpus.py)."""

    hidden: int = 256
    layers: int = 4
    vocab_size: int = 512  # BPE merges learned on the corpus, before the role and box tokens are added
    tie_word_embeddings: bool = True
    scenes: int = 4000  # distinct scenes written as text; every visit writes and asks a scene anew
    steps: int = 400
    # the share of the `steps` schedule trained (stopping while the learning rate is still high): an LM trained to the
    # end of its schedule reads a written scene better but is far harder for image tokens to steer in stage 1
    # (EXPERIMENTS.md, section 2)
    trained_share: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    test_scenes: int = 200
    num_coord_bins: int = 32  # the box quantization GranViT builds on this LM will use
    box_formats: dict = field(default_factory=lambda: {"tokens": 1.0})  # share of documents in each box format
    random_caption_share: float = 0.0  # documents whose objects get random word strings: only copying answers them
    # documents whose scene writes each caption's words in a random order ("pink hexagon small"; questions and answers
    # keep the caption's order): the LM learns to read an object's attributes by kind, not by their place in the text
    shuffled_words_share: float = 0.0
    # Gaussian noise on the written scene's input embeddings while training (std as a fraction of the embeddings' RMS
    # norm): the LM learns to read a scene from embeddings near its words', as image tokens will be, not only from
    # the words' own rows (EXPERIMENTS.md, section 2: a sharper LM was harder for stage 1 to steer)
    scene_noise: float = 0.0
    answers_only: bool = False  # loss on the answers of the region questions only (else on every token)
    templates: dict = field(default_factory=lambda: {"bbox2caption": "describe {box}", "caption2bbox": "find {caption}"})


@dataclass
class PartsRecipe:
    """Both parts and what they share."""

    seed: int = 0
    synth: dict = field(default_factory=dict)  # SynthConfig fields (+ preset) of the scenes both parts see
    siglip: SiglipRecipe = field(default_factory=SiglipRecipe)
    lm: LMRecipe = field(default_factory=LMRecipe)
    threads: int = 1  # torch threads per part
    parallel: bool = True  # train the two parts side by side, one process each
    bf16: bool = True  # bf16 autocast (AMX CPUs and GPUs: BENCHMARKS.md, "Pretrained parts")

    def synth_config(self) -> SynthConfig:
        return synth_config(self.synth, "parts.synth", "parts")


def parts_recipe(values: dict | None, source: str = "parts", where: str = "") -> PartsRecipe:
    """A PartsRecipe from a mapping (the YAML file `source`, or a GranViT recipe's section `where`: ``parts``); unknown
    keys and values of the wrong type are refused in one line naming the key (train/fields.py)."""
    recipe = typed(PartsRecipe, values, where, source)
    prefix = f"{where}." if where else ""
    if not 0 < recipe.lm.trained_share <= 1:
        raise UserError(f"{source}: {prefix}lm.trained_share: {recipe.lm.trained_share} is not a share of the schedule "
                        "in (0, 1]")
    synth_config(recipe.synth, f"{prefix}synth", source)  # unknown or impossible scene settings
    return recipe


def load_parts_recipe(path: str | Path = PARTS_CONFIG, overrides: list[str] = ()) -> PartsRecipe:
    """The parts recipe of a YAML file with ``key=value`` overrides (``lm.steps=100``)."""
    return parts_recipe(apply_overrides(load_yaml(path) or {}, list(overrides), "lm.steps=100"), str(path))


def part_hash(name: str, recipe: PartsRecipe) -> str:
    """12 hex digits of everything that decides part `name`'s weights (its recipe, the scenes, the seed, the code
    version): a shipped or cached part is reused only under the same hash."""
    part = recipe.siglip if name == "siglip" else recipe.lm
    synth = recipe.synth_config()
    if name == "siglip":
        synth = dataclasses.replace(synth, image_size=part.image_size)
    key = json.dumps({"version": PARTS_VERSION, "part": name, "recipe": dataclasses.asdict(part),
                      "synth": dataclasses.asdict(synth), "seed": recipe.seed}, sort_keys=True, default=list)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def from_granvit_recipe(recipe: dict, source: str = "recipe") -> PartsRecipe:
    """The parts a GranViT recipe trains for itself (``pretrain``; `recipe` as train/recipe.py's load_recipe returns
    it): its ``parts:`` section, with the scenes of its ``data.synth``, its seed, and its ``model`` section's box
    settings for the LM unless the section sets them."""
    values = dict(recipe["parts"] or {})
    model = recipe["model"]
    values.setdefault("seed", recipe["seed"])
    values.setdefault("synth", recipe["data"]["synth"])
    lm = dict(values.get("lm") or {})
    lm.setdefault("num_coord_bins", model["num_coord_bins"] or GranViTConfig.num_coord_bins)
    lm.setdefault("box_formats", {model["box_format"]: 1.0})
    templates = {task: model[f"{task}_template"] for task in ("bbox2caption", "caption2bbox")
                 if model[f"{task}_template"] is not None}
    lm.setdefault("templates", {**LMRecipe().templates, **templates})
    values["lm"] = lm
    return parts_recipe(values, source, "parts")
