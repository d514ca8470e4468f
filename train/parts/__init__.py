"""The embedded pretrained parts: a small SigLIP and a small causal LM, pretrained here the way the real ones are.

The paper builds GranViT from two pretrained parts, ``google/siglip2-base-patch16-512`` and ``Qwen/Qwen2.5-1.5B``.
Nothing can be downloaded on the machines this package is developed and tested on, so the package ships small
stand-ins, trained once by ``granvit-parts`` from ``train/configs/parts.yaml`` (shipped.py), and the main job composes
them with ``granvit-build``'s code path, exactly like a real build:

- vision (siglip.py): a ``SiglipModel`` trained with SigLIP's sigmoid image-text loss on synthetic images paired with
  *whole-image* captions: global alignment, nothing about regions, like the encoder the paper starts from;
- language (lm.py, corpus.py): a ``Qwen2ForCausalLM`` trained on text only, taught to read a scene written in its
  context (describe a box, find a caption), which the paper's frozen-LLM stage 1 relies on.

Both draw their scenes from the synthetic generator with their own seed (``seed + PARTS_SEED_OFFSET``): no image or
scene of the GranViT train / val / test splits is seen while pretraining a part. A recipe with ``vision: pretrain`` /
``llm: pretrain`` trains parts of its own ``parts:`` section in-process instead (cached by hash under
``$GRANVIT_CACHE/parts``, default ``~/.cache/granvit``): the tests and experiments that need other parts.
"""

from .recipe import PARTS_CONFIG, PARTS_SEED_OFFSET, LMRecipe, PartsRecipe, SiglipRecipe, load_parts_recipe, part_hash, parts_recipe
from .shipped import SHIPPED_DIR, shipped_part

__all__ = ["LMRecipe", "PARTS_CONFIG", "PARTS_SEED_OFFSET", "PartsRecipe", "SHIPPED_DIR", "SiglipRecipe",
           "load_parts_recipe", "part_hash", "parts_recipe", "shipped_part"]
