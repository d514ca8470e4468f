"""Dense region decoding: N region queries on one image for one image encode.

``model.describe_regions(processor, image, boxes)`` and ``model.ground(processor, image, phrases)`` (also behind
``pipeline("granvit-regions")``, pipeline_granvit.py) answer N queries about one image. The N prompts share their start
(chat scaffolding, the image tokens, the template text), and that shared prefix dominates the cost: 1024 image tokens at
512 px against ~10-40 query tokens. So the image is encoded once, the prefix runs through the LLM once, its KV cache is
repeated N times, the N distinct suffixes are prefilled as one right-aligned batch, and the N answers are decoded
greedily as one batch; rows leave the batch at eos.

Right alignment keeps the result exact: row i of the suffix batch is ``[pad] * (W - S_i) + suffix_i``, the pads are
masked out as keys, and the real tokens get position ids ``P .. P + S_i - 1`` exactly as in the unbatched prompt, so
every real token attends to the same keys at the same positions as in ``generate`` on that prompt alone. Greedy
outputs are token-identical to N independent ``generate`` calls in fp32 (guaranteed and tested:
tests/test_region_decoding.py).
"""

import functools
import logging

import torch
import transformers
from transformers import Cache, DynamicCache, LogitsProcessorList

from .box_grammar_granvit import BoxConstraintLogitsProcessor
from .grounding_granvit import NEGATIVE_TASK, GroundingRequestGrammar, box_scores, grounding_settings

logger = logging.getLogger(__name__)

# ---- the N-row prefix cache ------------------------------------------------------------------------------------------
# `PreallocatedKVLayer` extends transformers' `DynamicLayer` and sets its internals (`keys`, `values`, `is_initialized`,
# `device`). This file ships inside every checkpoint, so a transformers release that changes the cache must not break
# models already on the Hub: the layer is used only when `preallocated_cache_works()` (a self-check against
# `DynamicCache` on the installed version) passes; otherwise dense decoding takes the public path,
# `DynamicCache.batch_repeat_interleave` (slower, same tokens). tests/test_region_decoding.py runs both paths.
_DynamicLayer = getattr(transformers, "DynamicLayer", None)


class PreallocatedKVLayer(_DynamicLayer if isinstance(_DynamicLayer, type) else object):
    """A ``DynamicLayer`` that writes new keys/values into spare capacity instead of concatenating.

    ``DynamicLayer.update`` concatenates, so every decode step copies the whole cache: N rows of the ~1000-token
    shared prefix, each step. Here the shared prefix is broadcast into N rows once and each step writes only its new
    slots. ``keys`` / ``values`` stay views of the filled part, so attention sees exactly what a ``DynamicLayer`` would
    hold.
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int, capacity: int):
        super().__init__()
        _, heads, length, _ = prefix_keys.shape  # (1, kv_heads, prefix, head_dim)
        self.buffer_keys = prefix_keys.new_empty((rows, heads, capacity, prefix_keys.shape[-1]))
        self.buffer_values = prefix_values.new_empty((rows, heads, capacity, prefix_values.shape[-1]))
        self.buffer_keys[:, :, :length] = prefix_keys
        self.buffer_values[:, :, :length] = prefix_values
        self.length = length
        self.device = prefix_keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.buffer_keys[:, :, : self.length]
        self.values = self.buffer_values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buffer_keys.shape[2]:
            raise RuntimeError(f"PreallocatedKVLayer is full ({self.buffer_keys.shape[2]} slots)")
        self.buffer_keys[:, :, self.length : end] = key_states
        self.buffer_values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffer_keys, self.buffer_values = self.buffer_keys[indices], self.buffer_values[indices]
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedKVLayer is only used for greedy dense decoding, which never crops")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PreallocatedKVLayer is built with its rows; it never repeats them")


def _preallocated_cache_problem() -> str | None:
    """What goes wrong when the preallocated cache replays dense decoding's cache calls next to ``DynamicCache``, or
    None when every answer agrees (tiny tensors: a prefix, a suffix batch, rows leaving, one decode step)."""
    if not isinstance(_DynamicLayer, type):
        return "this transformers has no DynamicLayer"
    generator = torch.Generator().manual_seed(0)

    def kv(rows: int, length: int) -> list[torch.Tensor]:
        return [torch.randn(rows, 2, length, 4, generator=generator) for _ in range(2)]  # (rows, heads, len, dim)

    prefix = kv(1, 3)
    reference = DynamicCache()
    reference.update(*prefix, 0)
    reference.batch_repeat_interleave(2)
    ours = Cache(layers=[PreallocatedKVLayer(*prefix, rows=2, capacity=6)])
    for rows, length, keep in ((2, 2, None), (1, 1, torch.tensor([1]))):
        if keep is not None:
            reference.batch_select_indices(keep)
            ours.batch_select_indices(keep)
        new = kv(rows, length)
        expected, got = reference.update(*new, 0), ours.update(*new, 0)
        if not all(torch.equal(a, b) for a, b in zip(expected, got)):
            return "keys/values differ from DynamicCache's"
        if ours.get_seq_length(0) != reference.get_seq_length(0):
            return f"get_seq_length {ours.get_seq_length(0)} != DynamicCache's {reference.get_seq_length(0)}"
    return None


@functools.cache
def preallocated_cache_works() -> bool:
    """Whether ``PreallocatedKVLayer`` behaves like ``DynamicLayer`` under the installed transformers (checked once)."""
    try:
        problem = _preallocated_cache_problem()
    except Exception as err:  # noqa: BLE001 -- any change of the internals it relies on; the fallback is exact
        problem = f"{type(err).__name__}: {err}"
    if problem:
        logger.warning(
            "GranViT dense decoding: the preallocated KV cache does not fit transformers %s (%s); using "
            "DynamicCache.batch_repeat_interleave instead (same tokens, slower)", transformers.__version__, problem
        )
    return problem is None


def expand_prefix_cache(cache: DynamicCache, rows: int, capacity: int) -> Cache:
    """A batch-1 prefix cache -> a cache of ``rows`` copies with room for ``capacity`` tokens per row.

    Layers other than plain ``DynamicLayer`` (sliding windows, linear attention), or a transformers where the
    preallocated layer fails its self-check, keep the public path: ``DynamicCache.batch_repeat_interleave``, exact
    but copying the whole cache every step.
    """
    if not preallocated_cache_works() or any(type(layer) is not _DynamicLayer for layer in cache.layers):
        cache.batch_repeat_interleave(rows)
        return cache
    return Cache(layers=[PreallocatedKVLayer(layer.keys, layer.values, rows, capacity) for layer in cache.layers])


# ---- dense greedy decoding ---------------------------------------------------------------------------------------------
def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own.

    The last prompt token of each row must be run in the suffix batch: its logits give that row's first answer token.
    """
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


@torch.no_grad()
def dense_greedy_generate(
    model,
    sequences: list[list[int]],
    pixel_values: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    logits_processor: LogitsProcessorList | None = None,
    image_grids: torch.Tensor | None = None,
    return_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations of N prompts that share one image (and usually a long prefix), as one batch.

    Args:
        model: a ``GranViTForConditionalGeneration``.
        sequences: N unpadded prompt token-id lists, each with the image's ``<image>`` tokens in the shared prefix.
        pixel_values: (views, 3, S, S) the one image (one view, or with tiling its thumbnail and tiles).
        image_grids: (1, 2) its tile grid (tiling checkpoints only).
        eos_token_ids: a row stops after emitting any of them (the eos is kept in its output, as ``generate`` does).
    Returns:
        N lists of generated token ids (at most ``max_new_tokens`` each); with ``return_logprobs`` also, per row, the
        log-probability of each generated token under the processed scores it was picked from (grammar included).
    """
    n = len(sequences)
    if n == 0:
        return ([], []) if return_logprobs else []
    image_token_id = model.config.image_token_id
    shared = shared_prefix_length(sequences)
    suffixes = [s[shared:] for s in sequences]
    if any(image_token_id in s for s in suffixes):
        raise ValueError(
            "Dense decoding needs every <image> token in the prefix the prompts share (the image is encoded once); "
            "put the image before any per-query text"
        )
    device = pixel_values.device

    # 1. Image encode + shared prefix, once: (1, P).
    cache = DynamicCache(config=model.config.text_config)
    prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long, device=device)
    model(input_ids=prefix, pixel_values=pixel_values, image_grids=image_grids, cache=cache, use_cache=True,
          logits_to_keep=1)

    # 2. The N suffixes, right-aligned in one (N, W) batch: pads on the left, masked, real tokens at P .. P+S_i-1.
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    width = int(lengths.max())
    suffix_ids = torch.full((n, width), pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.full((n, width), shared, dtype=torch.long, device=device)
    attention_mask = torch.ones((n, shared + width), dtype=torch.long, device=device)
    cache = expand_prefix_cache(cache, n, shared + width + max_new_tokens)
    for i, s in enumerate(suffixes):
        start = width - len(s)
        suffix_ids[i, start:] = torch.tensor(s, device=device)
        position_ids[i, start:] = torch.arange(shared, shared + len(s), device=device)
        attention_mask[i, shared : shared + start] = 0
    out = model(
        input_ids=suffix_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    # What logits processors see, as in `generate`: prompt + generated so far per row (pads never sit in the tail).
    input_ids = torch.cat([prefix.expand(n, -1), suffix_ids], dim=1)
    next_position = shared + lengths  # (N,)

    # 3. Greedy decoding; finished rows leave the batch (and the cache), so late steps run only on live rows.
    eos = torch.tensor(eos_token_ids, device=device)
    generated: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    rows = torch.arange(n, device=device)  # original index of each live row
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        scores = logits.to(dtype=torch.float32)  # `generate` also scores in fp32
        if logits_processor is not None:
            scores = logits_processor(input_ids, scores)
        next_tokens = scores.argmax(dim=-1)  # (live,)
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            generated[row].append(token)
        if return_logprobs:
            chosen = torch.log_softmax(scores, dim=-1).gather(1, next_tokens.unsqueeze(1)).squeeze(1)
            for row, value in zip(rows.tolist(), chosen.tolist()):
                logprobs[row].append(value)
        live = ~torch.isin(next_tokens, eos)
        if step == max_new_tokens - 1 or not live.any():
            break
        if not live.all():
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_tokens, next_position = rows[keep], next_tokens[keep], next_position[keep]
            input_ids, attention_mask = input_ids[keep], attention_mask[keep]
        input_ids = torch.cat([input_ids, next_tokens.unsqueeze(1)], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        out = model(
            input_ids=next_tokens.unsqueeze(1),
            attention_mask=attention_mask,
            position_ids=next_position.unsqueeze(1),
            cache=cache,
            use_cache=True,
        )
        next_position = next_position + 1
        logits = out.logits[:, -1]
    return (generated, logprobs) if return_logprobs else generated


class GranViTRegionDecodingMixin:
    """Dense region APIs for ``GranViTForConditionalGeneration`` (greedy; see the module docstring)."""

    def _dense_inputs(self, processor, image) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """(pixel_values, original (width, height), image_grids or None) of one image."""
        features = processor.image_processor([image])
        grids = features.get("image_grids")
        return features["pixel_values"].to(self.device), tuple(features["image_sizes"][0]), grids

    def _eos_and_pad(self, processor) -> tuple[list[int], int]:
        eos = self.generation_config.eos_token_id
        eos = processor.tokenizer.eos_token_id if eos is None else eos
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = self.generation_config.pad_token_id
        return eos, eos[0] if pad is None else pad

    def _dense_ids(self, processor, inputs, prompts, max_new_tokens, logits_processor, return_logprobs=False):
        pixel_values, _, grids = inputs
        eos, pad = self._eos_and_pad(processor)
        return dense_greedy_generate(
            self, processor.prompt_ids(prompts, image_grids=grids), pixel_values, max_new_tokens, eos, pad,
            logits_processor, image_grids=None if grids is None else grids.to(self.device),
            return_logprobs=return_logprobs,
        )

    @property
    def grounds_not_found(self) -> bool:
        """Whether this checkpoint learned the "not found" answer (trained with the caption2bbox_negative task)."""
        return NEGATIVE_TASK in (self.config.trained_tasks or [])

    def box_constraint(self, processor, force_box: bool = False) -> BoxConstraintLogitsProcessor:
        """The box-grammar ``LogitsProcessor`` for this model's tokens, for ``generate(logits_processor=[...])``
        (a handle for ``trust_remote_code`` users, who cannot import this module by name); with ``force_box`` the
        answer may also be "not found" when the checkpoint learned it."""
        return BoxConstraintLogitsProcessor.from_processor(processor, force_box=force_box,
                                                           not_found=self.grounds_not_found)

    def configure_grounding(self, processor) -> None:
        """Write what ``generate`` needs to decode grounding requests under the box grammar on its own into
        ``generation_config.granvit_grounding`` (grounding_granvit.py); the checkpoint builder calls it on save."""
        self.generation_config.granvit_grounding = grounding_settings(processor, not_found=self.grounds_not_found)

    def request_grammar(self, generation_config=None) -> GroundingRequestGrammar | None:
        """The grammar ``generate`` adds for grounding requests (None: the checkpoint has no grounding settings).
        A ``generation_config`` without the field falls back to the model's, as ``generate`` does for custom fields."""
        settings = getattr(self.generation_config, "granvit_grounding", None)
        if generation_config is not None:
            settings = getattr(generation_config, "granvit_grounding", settings)
        return GroundingRequestGrammar(settings) if settings else None

    @torch.no_grad()
    def dense_generate(
        self,
        processor,
        image,
        prompts: list[str],
        max_new_tokens: int = 20,
        logits_processor: LogitsProcessorList | None = None,
        constrain_boxes: bool = True,
    ) -> list[list[int]]:
        """Greedy answers (token ids) to N user prompts about one image: one image encode, one shared prefill.

        Token-identical (fp32) to ``model.generate(**processor(images=[image], text=[p]), do_sample=False)`` per
        prompt, with the same ``logits_processor`` and ``constrain_boxes`` (grounding requests under the box grammar,
        as ``generate`` decodes them). Rows include their eos when they stop before ``max_new_tokens``.
        """
        processors = LogitsProcessorList(logits_processor or [])
        grammar = self.request_grammar() if constrain_boxes else None
        if grammar is not None:
            processors.append(grammar)
        return self._dense_ids(processor, self._dense_inputs(processor, image), prompts, max_new_tokens, processors)

    @torch.no_grad()
    def describe_regions(
        self,
        processor,
        image,
        boxes,
        max_new_tokens: int = 20,
        logits_processor: LogitsProcessorList | None = None,
    ) -> list[str]:
        """One caption per box (``[x1, y1, x2, y2]`` original pixels), all from one image encode and one batch."""
        inputs = self._dense_inputs(processor, image)
        prompts = [processor.bbox2caption_prompt(box, inputs[1]) for box in boxes]
        ids = self._dense_ids(processor, inputs, prompts, max_new_tokens, logits_processor)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def ground(
        self,
        processor,
        image,
        phrases: list[str],
        max_new_tokens: int | None = None,
        constrain_boxes: bool = True,
        logits_processor: LogitsProcessorList | None = None,
        return_scores: bool = False,
        threshold: float | None = None,
    ) -> list[list[list[float]]] | list[dict]:
        """Boxes (original pixels) for each phrase.

        ``constrain_boxes`` adds the box grammar of the processor's box format with the answer forced to be boxes, so
        every answer holds at least one well-formed box (given ``max_new_tokens >= processor.max_box_tokens``; the
        default leaves room for two boxes), or, for a checkpoint trained with negatives, is "not found" (no boxes).
        Each box gets a score in [0, 1] (grounding_granvit.py ``box_scores``); ``threshold`` drops boxes scoring below
        it, so a phrase whose boxes all fall below is answered "not found" too. ``return_scores``: per phrase
        ``{"boxes": [...], "scores": [...]}`` (the detection post-processors' shape) instead of the list of boxes."""
        max_new_tokens = max_new_tokens or 2 * processor.max_box_tokens + 4
        inputs = self._dense_inputs(processor, image)
        processors = LogitsProcessorList(logits_processor or [])
        if constrain_boxes:
            processors.append(self.box_constraint(processor, force_box=True))
        prompts = [processor.caption2bbox_prompt(phrase) for phrase in phrases]
        ids, logprobs = self._dense_ids(processor, inputs, prompts, max_new_tokens, processors, return_logprobs=True)
        results = []
        for boxes, scores in zip(processor.post_process_grounding(ids, [inputs[1]] * len(ids)),
                                 (box_scores(processor, i, lp) for i, lp in zip(ids, logprobs))):
            kept = [k for k, score in enumerate(scores) if threshold is None or score >= threshold]
            results.append({"boxes": [boxes[k] for k in kept], "scores": [scores[k] for k in kept]})
        return results if return_scores else [r["boxes"] for r in results]


__all__ = [
    "GranViTRegionDecodingMixin",
    "PreallocatedKVLayer",
    "dense_greedy_generate",
    "expand_prefix_cache",
    "preallocated_cache_works",
    "shared_prefix_length",
]
