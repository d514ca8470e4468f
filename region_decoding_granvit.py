"""Dense region decoding: N region queries on one image for one image encode, and boxes that always parse.

``model.describe_regions(processor, image, boxes)`` and ``model.ground(processor, image, phrases)`` answer N queries
about one image. The N prompts share their start (chat scaffolding, the image tokens, the template text), and that
shared prefix dominates the cost: 1024 image tokens at 512 px against ~10-40 query tokens. So the image is encoded once,
the prefix runs through the LLM once, its KV cache is repeated N times, the N distinct suffixes are prefilled as one
right-aligned batch, and the N answers are decoded greedily as one batch; rows leave the batch at eos.

Right alignment keeps the result exact: row i of the suffix batch is ``[pad] * (W - S_i) + suffix_i``, the pads are
masked out as keys, and the real tokens get position ids ``P .. P + S_i - 1`` exactly as in the unbatched prompt, so
every real token attends to the same keys at the same positions as in ``generate`` on that prompt alone. Greedy
outputs are token-identical to N independent ``generate`` calls in fp32 (tests/test_region_decoding.py).

``BoxConstraintLogitsProcessor`` is the box grammar as a ``transformers.LogitsProcessor``: after ``<box>`` only
coordinate tokens in x1, y1, x2, y2 order with x2 > x1 and y2 > y1 (in bins), then ``</box>``; outside a box no coordinate
token and no ``</box>``; optionally the answer must start with ``<box>`` (grounding). It works in ``generate``
(``logits_processor=LogitsProcessorList([...])``) and in the dense APIs.

CPU inference precision (bench/region_bench.py, this AMX CPU, 512 px): bf16 *weights*
(``from_pretrained(..., dtype=torch.bfloat16)``) with the default sdpa attention ran 2.1-2.3x faster than fp32 and gave
the same greedy captions; ``torch.autocast`` over fp32 weights gained only 1.1-1.4x, and eager attention was slower
than sdpa at 1000+ tokens in every precision. Token identity with ``generate`` is guaranteed (and tested) in fp32.
"""

import torch
from transformers import Cache, DynamicCache, DynamicLayer, LogitsProcessor, LogitsProcessorList


class BoxConstraintLogitsProcessor(LogitsProcessor):
    """Masks every token that would break ``<box><coord_x1><coord_y1><coord_x2><coord_y2></box>``.

    The state is read from the last five tokens of each row, so it needs no per-call set-up, works with any batch
    layout (left padding in ``generate``, right-aligned suffixes in the dense APIs) and ignores the boxes in a prompt:
    a prompt box is closed by ``</box>`` before the answer starts.

    Args:
        box_start_token_id, box_end_token_id: ids of ``<box>`` and ``</box>``.
        coord_token_start_id: id of ``<coord_0>``; ``<coord_i>`` is ``coord_token_start_id + i``.
        num_coord_bins: number of coordinate tokens.
        force_box_after_token_id: if set (the id of ``<|assistant|>``), the token after it must be ``<box>``: a
            grounding answer then always contains a box.
    """

    def __init__(
        self,
        box_start_token_id: int,
        box_end_token_id: int,
        coord_token_start_id: int,
        num_coord_bins: int,
        force_box_after_token_id: int | None = None,
    ):
        self.box_start = int(box_start_token_id)
        self.box_end = int(box_end_token_id)
        self.coord_start = int(coord_token_start_id)
        self.num_bins = int(num_coord_bins)
        self.force_after = None if force_box_after_token_id is None else int(force_box_after_token_id)

    @classmethod
    def from_processor(cls, processor, force_box: bool = False) -> LogitsProcessor:
        """The box grammar for a ``GranViTProcessor``'s box format; ``force_box=True`` makes the answer a box.

        ``box_format="text"`` gets a ``TextBoxConstraintLogitsProcessor``.
        """
        assistant_id = processor.tokenizer.convert_tokens_to_ids("<|assistant|>") if force_box else None
        if getattr(processor, "box_format", "tokens") == "text":
            return TextBoxConstraintLogitsProcessor.from_processor(processor, force_box)
        return cls(
            processor.box_start_token_id,
            processor.box_end_token_id,
            processor.coord_token_start_id,
            processor.num_coord_bins,
            force_box_after_token_id=assistant_id,
        )

    def _bin(self, token_id: int) -> int | None:
        b = token_id - self.coord_start
        return b if 0 <= b < self.num_bins else None

    def allowed_range(self, tail: list[int]) -> tuple[int, int] | None:
        """Token-id interval ``[lo, hi)`` allowed next inside a box, or None outside one. ``tail``: the last tokens."""
        for k in range(5):  # k = coordinates already written after the last <box>
            if len(tail) <= k or tail[-k - 1] != self.box_start:
                continue
            bins = [self._bin(t) for t in tail[len(tail) - k :]]
            if any(b is None for b in bins):
                continue
            if k == 4:
                return self.box_end, self.box_end + 1
            # x2 > x1 and y2 > y1 in bins, so a decoded box always has an area (bin centres of equal bins would give
            # a zero-area box, which no caller can use): x1, y1 stop one bin short of the end.
            if k < 2:
                return self.coord_start, self.coord_start + self.num_bins - 1
            return self.coord_start + bins[k - 2] + 1, self.coord_start + self.num_bins
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (batch, seq) prompt + generated so far; scores: (batch, vocab) next-token logits.
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        is_coord = (vocab >= self.coord_start) & (vocab < self.coord_start + self.num_bins)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        for row, tail in enumerate(input_ids[:, -5:].tolist()):
            span = self.allowed_range(tail)
            if span is not None:
                allowed[row] = (vocab >= span[0]) & (vocab < span[1])
            elif self.force_after is not None and tail[-1] == self.force_after:
                allowed[row] = vocab == self.box_start
            else:
                allowed[row] = ~is_coord & (vocab != self.box_end)
        return scores.masked_fill(~allowed, float("-inf"))


class _TextBoxGrammar:
    """Character-level grammar of a text-format grounding answer: ``[a, b, c, d]`` boxes joined by ``", "``.

    Integers are bins in 0 .. N-1 without leading zeros, with c > a and d > b (so every box has an area). A state is
    a small tuple, advanced one character at a time; ``None`` means the characters so far can never become an answer.
    """

    def __init__(self, num_bins: int):
        self.n = num_bins

    START = ("box", 0, "", ())  # expecting "[" ; (phase, number index, digits so far, finished numbers)

    def advance(self, state, char: str):
        phase, k, digits, done = state
        if phase == "box":
            return ("num", 0, "", ()) if char == "[" else None
        if phase == "num":
            if char.isdigit():
                digits += char
                return ("num", k, digits, done) if self._completable(digits, k, done) else None
            if not digits or not self._final_ok(int(digits), k, done):
                return None
            if char == "," and k < 3:
                return ("space", k + 1, "", done + (int(digits),))
            if char == "]" and k == 3:
                return ("after", 0, "", ())
            return None
        if phase == "space":
            return ("num", k, "", done) if char == " " else None
        if phase == "after":
            return ("next", 0, "", ()) if char == "," else None
        if phase == "next":
            return ("box", 0, "", ()) if char == " " else None
        return None

    def _lower(self, k: int, done: tuple) -> int:
        """Smallest allowed value of number k: x2 > x1 and y2 > y1."""
        return done[k - 2] + 1 if k >= 2 else 0

    def _upper(self, k: int) -> int:
        return self.n - 2 if k < 2 else self.n - 1  # x1, y1 leave room for x2, y2

    def _final_ok(self, value: int, k: int, done: tuple) -> bool:
        return self._lower(k, done) <= value <= self._upper(k)

    def _completable(self, digits: str, k: int, done: tuple) -> bool:
        if len(digits) > 1 and digits[0] == "0":
            return False  # no leading zeros: one spelling per number
        value, scale = int(digits), 1
        if value == 0:  # "0" takes no more digits
            return self._lower(k, done) == 0
        while value * scale <= self._upper(k):  # digits followed by log10(scale) more digits can land in range
            if value * scale + scale - 1 >= self._lower(k, done):
                return True
            scale *= 10
        return False

    def walk(self, state, text: str):
        for char in text:
            state = self.advance(state, char)
            if state is None:
                return None
        return state


class TextBoxConstraintLogitsProcessor(LogitsProcessor):
    """Box grammar for ``box_format="text"``: after ``<|assistant|>`` the answer must be ``[a, b, c, d]`` boxes
    (joined by ``", "``) and then eos, with valid bins and x2 > x1, y2 > y1.

    The answer so far is read back from each row's tokens after its last ``<|assistant|>``, so, like the token
    grammar, it needs no per-call state and works in ``generate`` and the dense APIs. Only tokens whose text is made of
    ``[]``, ``,``, space and digits can be part of a box; they are found once per tokenizer. Rows without
    ``<|assistant|>`` (and every row when ``force_box`` is off: text boxes are then ordinary text) are not constrained.
    """

    CHARS = frozenset("[], 0123456789")

    def __init__(self, token_texts: dict[int, str], eos_token_ids: list[int], assistant_token_id: int | None, num_bins: int):
        self.token_texts = token_texts  # candidate token id -> its text
        self.candidate_ids = sorted(token_texts)
        self.eos = [int(e) for e in eos_token_ids]
        self.assistant = assistant_token_id
        self.grammar = _TextBoxGrammar(int(num_bins))

    @classmethod
    def from_processor(cls, processor, force_box: bool = False) -> "TextBoxConstraintLogitsProcessor":
        tokenizer = processor.tokenizer
        cache = getattr(processor, "_text_box_candidates", None)
        if cache is None:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            cache = {i: t for i, t in enumerate(texts) if t and set(t) <= cls.CHARS}
            processor._text_box_candidates = cache
        assistant = tokenizer.convert_tokens_to_ids("<|assistant|>") if force_box else None
        return cls(cache, [tokenizer.eos_token_id], assistant, processor.num_coord_bins)

    def answer_state(self, row: list[int]):
        """Grammar state after the answer tokens of ``row`` (``None``: off the grammar; ``False``: unconstrained)."""
        if self.assistant is None or self.assistant not in row:
            return False
        start = len(row) - row[::-1].index(self.assistant)
        state = _TextBoxGrammar.START
        for token in row[start:]:
            text = self.token_texts.get(token)
            if text is None:
                return None
            state = self.grammar.walk(state, text)
            if state is None:
                return None
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (batch, seq) prompt + generated so far; scores: (batch, vocab) next-token logits.
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row, ids in enumerate(input_ids.tolist()):
            state = self.answer_state(ids)
            if state is False or state is None:
                allowed[row] = True  # unconstrained row, or a row that already left the grammar (finished)
                continue
            ok = [t for t in self.candidate_ids if self.grammar.walk(state, self.token_texts[t]) is not None]
            allowed[row, ok] = True
            if state[0] == "after":
                allowed[row, self.eos] = True
        return scores.masked_fill(~allowed, float("-inf"))


class PreallocatedKVLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys/values into spare capacity instead of concatenating.

    ``DynamicLayer.update`` concatenates, so every decode step copies the whole cache; with N rows over a ~1000-token
    shared prefix that copy was ~30% of dense decoding time on CPU. Here the shared prefix is broadcast into N rows
    once and each step writes only its new slots. ``keys`` / ``values`` stay views of the filled part, so attention
    sees exactly what a ``DynamicLayer`` would hold.
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


def expand_prefix_cache(cache: DynamicCache, rows: int, capacity: int) -> Cache:
    """A batch-1 prefix cache -> a cache of ``rows`` copies with room for ``capacity`` tokens per row.

    Layers other than plain ``DynamicLayer`` (sliding windows, linear attention) keep their own update rules, so the
    whole cache then falls back to ``DynamicCache.batch_repeat_interleave``, which is exact but copies every step.
    """
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        cache.batch_repeat_interleave(rows)
        return cache
    return Cache(layers=[PreallocatedKVLayer(l.keys, l.values, rows, capacity) for l in cache.layers])


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
) -> list[list[int]]:
    """Greedy continuations of N prompts that share one image (and usually a long prefix), as one batch.

    Args:
        model: a ``GranViTForConditionalGeneration``.
        sequences: N unpadded prompt token-id lists, each with the image's ``<image>`` tokens in the shared prefix.
        pixel_values: (1, 3, S, S) the one image.
        eos_token_ids: a row stops after emitting any of them (the eos is kept in its output, as ``generate`` does).
    Returns:
        N lists of generated token ids (at most ``max_new_tokens`` each).
    """
    n = len(sequences)
    if n == 0:
        return []
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
    model(input_ids=prefix, pixel_values=pixel_values, cache=cache, use_cache=True, logits_to_keep=1)

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
    rows = torch.arange(n, device=device)  # original index of each live row
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        scores = logits.to(dtype=torch.float32)  # `generate` also scores in fp32
        if logits_processor is not None:
            scores = logits_processor(input_ids, scores)
        next_tokens = scores.argmax(dim=-1)  # (live,)
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            generated[row].append(token)
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
    return generated


class GranViTRegionDecodingMixin:
    """Dense region APIs for ``GranViTForConditionalGeneration`` (greedy; see the module docstring)."""

    def _dense_inputs(self, processor, image) -> tuple[torch.Tensor, tuple[int, int]]:
        features = processor.image_processor([image])
        return features["pixel_values"].to(self.device), tuple(features["image_sizes"][0])

    def _eos_and_pad(self, processor) -> tuple[list[int], int]:
        eos = self.generation_config.eos_token_id
        eos = processor.tokenizer.eos_token_id if eos is None else eos
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = self.generation_config.pad_token_id
        return eos, eos[0] if pad is None else pad

    def _dense_ids(self, processor, pixel_values, prompts, max_new_tokens, logits_processor) -> list[list[int]]:
        eos, pad = self._eos_and_pad(processor)
        return dense_greedy_generate(
            self, processor.prompt_ids(prompts), pixel_values, max_new_tokens, eos, pad, logits_processor
        )

    def box_constraint(self, processor, force_box: bool = False) -> BoxConstraintLogitsProcessor:
        """The box-grammar ``LogitsProcessor`` for this model's tokens, for ``generate(logits_processor=[...])``
        (a handle for ``trust_remote_code`` users, who cannot import this module by name)."""
        return BoxConstraintLogitsProcessor.from_processor(processor, force_box=force_box)

    @torch.no_grad()
    def dense_generate(
        self,
        processor,
        image,
        prompts: list[str],
        max_new_tokens: int = 20,
        logits_processor: LogitsProcessorList | None = None,
    ) -> list[list[int]]:
        """Greedy answers (token ids) to N user prompts about one image: one image encode, one shared prefill.

        Token-identical (fp32) to ``model.generate(**processor(images=[image], text=[p]), do_sample=False)`` per
        prompt, with the same ``logits_processor``. Rows include their eos when they stop before ``max_new_tokens``.
        """
        pixel_values, _ = self._dense_inputs(processor, image)
        return self._dense_ids(processor, pixel_values, prompts, max_new_tokens, logits_processor)

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
        pixel_values, image_size = self._dense_inputs(processor, image)
        prompts = [processor.bbox2caption_prompt(box, image_size) for box in boxes]
        ids = self._dense_ids(processor, pixel_values, prompts, max_new_tokens, logits_processor)
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
    ) -> list[list[list[float]]]:
        """Boxes (original pixels) for each phrase. ``constrain_boxes`` adds the box grammar of the processor's box
        format with the answer forced to be a box, so every answer holds at least one well-formed box (given
        ``max_new_tokens >= processor.max_box_tokens``; the default leaves room for two boxes)."""
        max_new_tokens = max_new_tokens or 2 * processor.max_box_tokens + 4
        pixel_values, image_size = self._dense_inputs(processor, image)
        processors = LogitsProcessorList(logits_processor or [])
        if constrain_boxes:
            processors.append(BoxConstraintLogitsProcessor.from_processor(processor, force_box=True))
        prompts = [processor.caption2bbox_prompt(phrase) for phrase in phrases]
        ids = self._dense_ids(processor, pixel_values, prompts, max_new_tokens, processors)
        return processor.post_process_grounding(ids, [image_size] * len(ids))


__all__ = [
    "BoxConstraintLogitsProcessor",
    "TextBoxConstraintLogitsProcessor",
    "GranViTRegionDecodingMixin",
    "PreallocatedKVLayer",
    "dense_greedy_generate",
    "expand_prefix_cache",
    "shared_prefix_length",
]
