"""The box grammar as ``transformers.LogitsProcessor``s: generated boxes always parse and always have an area.

``BoxConstraintLogitsProcessor.from_processor(processor, force_box)`` picks the grammar of the processor's box format:

- ``"tokens"``: after ``<box>`` only coordinate tokens in x1, y1, x2, y2 order with x2 > x1 and y2 > y1 (in bins), then
  ``</box>``; outside a box no coordinate token and no ``</box>``; with ``force_box`` the answer starts with ``<box>``.
- ``"text"`` (``TextBoxConstraintLogitsProcessor``): with ``force_box`` the answer is ``[a, b, c, d]`` boxes joined by
  ``", "``, then eos, with valid bins and c > a, d > b; without it text boxes are ordinary text and nothing is masked.

With ``force_box`` and ``not_found_ids`` (a checkpoint trained with negatives, grounding_granvit.py) the answer is
either boxes or exactly the "not found" answer, then eos.

Both read their state back from each row's tokens, so they need no per-call set-up and work in ``generate``
(``logits_processor=LogitsProcessorList([...])``, or ``model.box_constraint(processor)`` for ``trust_remote_code`` users)
and in the dense region APIs (region_decoding_granvit.py).
"""

import torch
from transformers import LogitsProcessor

from .box_codec_granvit import TEXT_BOX_CLOSE, TEXT_BOX_OPEN, TEXT_BOX_SEPARATOR, TEXT_COORD_SEPARATOR
from .prompts_granvit import ASSISTANT_TOKEN


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
        not_found_ids, eos_token_id: with ``force_box_after_token_id``, the answer may instead be exactly these tokens
            (the "not found" answer), then eos.
    """

    def __init__(
        self,
        box_start_token_id: int,
        box_end_token_id: int,
        coord_token_start_id: int,
        num_coord_bins: int,
        force_box_after_token_id: int | None = None,
        not_found_ids: list[int] | None = None,
        eos_token_id: int | None = None,
    ):
        self.box_start = int(box_start_token_id)
        self.box_end = int(box_end_token_id)
        self.coord_start = int(coord_token_start_id)
        self.num_bins = int(num_coord_bins)
        self.force_after = None if force_box_after_token_id is None else int(force_box_after_token_id)
        self.not_found = [int(t) for t in not_found_ids or []] if self.force_after is not None else []
        if self.not_found and eos_token_id is None:
            raise ValueError("not_found_ids need eos_token_id: the 'not found' answer ends with eos")
        self.eos = None if eos_token_id is None else int(eos_token_id)

    @classmethod
    def from_processor(cls, processor, force_box: bool = False, not_found: bool = False) -> LogitsProcessor:
        """The box grammar for a ``GranViTProcessor``'s box format; ``force_box=True`` makes the answer a box, or with
        ``not_found=True`` either boxes or the processor's "not found" answer.

        ``box_format="text"`` gets a ``TextBoxConstraintLogitsProcessor``.
        """
        assistant_id = processor.tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN) if force_box else None
        not_found_ids = processor.not_found_ids if force_box and not_found else None
        if getattr(processor, "box_format", "tokens") == "text":
            return TextBoxConstraintLogitsProcessor.from_processor(processor, force_box, not_found)
        return cls(
            processor.box_start_token_id,
            processor.box_end_token_id,
            processor.coord_token_start_id,
            processor.num_coord_bins,
            force_box_after_token_id=assistant_id,
            not_found_ids=not_found_ids,
            eos_token_id=processor.tokenizer.eos_token_id,
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

    def not_found_progress(self, tail: list[int]) -> int | None:
        """How many tokens of the "not found" answer the answer ending ``tail`` has written (None: it is not that)."""
        for k in range(1, len(self.not_found) + 1):
            if len(tail) > k and tail[-k - 1] == self.force_after and tail[-k:] == self.not_found[:k]:
                return k
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (batch, seq) prompt + generated so far; scores: (batch, vocab) next-token logits.
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        is_coord = (vocab >= self.coord_start) & (vocab < self.coord_start + self.num_bins)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        for row, tail in enumerate(input_ids[:, -max(5, len(self.not_found) + 1) :].tolist()):
            span = self.allowed_range(tail[-5:])
            written = self.not_found_progress(tail) if self.not_found else None
            if span is not None:
                allowed[row] = (vocab >= span[0]) & (vocab < span[1])
            elif written is not None:
                allowed[row] = vocab == (self.not_found[written] if written < len(self.not_found) else self.eos)
            elif self.force_after is not None and tail[-1] == self.force_after:
                allowed[row] = (vocab == self.box_start) | (vocab == (self.not_found[0] if self.not_found else -1))
            else:
                allowed[row] = ~is_coord & (vocab != self.box_end)
        return scores.masked_fill(~allowed, float("-inf"))


class _TextBoxGrammar:
    """Character-level grammar of a text-format grounding answer, spelled by the codec (box_codec_granvit.py):
    ``[a, b, c, d]`` boxes joined by ``", "``.

    Integers are bins in 0 .. N-1 without leading zeros, with c > a and d > b (so every box has an area). A state is
    a small tuple ``(phase, number index, digits so far, finished numbers, literal still to write)``, advanced one
    character at a time; ``None`` means the characters so far can never become an answer. Phases: ``"literal"`` (the
    box opening or a separator, then a number), ``"num"``, ``"close"`` (the box closing) and ``"after"`` (a complete
    answer: eos, or the next box).
    """

    def __init__(self, num_bins: int):
        self.n = num_bins
        self.start = ("literal", 0, "", (), TEXT_BOX_OPEN)

    def advance(self, state, char: str):
        phase, k, digits, done, rest = state
        if phase in ("literal", "close"):
            if not rest.startswith(char):
                return None
            if rest[1:]:
                return phase, k, digits, done, rest[1:]
            return ("num", k, "", done, "") if phase == "literal" else ("after", 0, "", (), "")
        if phase == "num":
            if char.isdigit():
                digits += char
                return ("num", k, digits, done, "") if self._completable(digits, k, done) else None
            if not digits or not self._final_ok(int(digits), k, done):
                return None
            if k < 3:  # the number is finished: the separator to the next one starts with this character
                return self.advance(("literal", k + 1, "", done + (int(digits),), TEXT_COORD_SEPARATOR), char)
            return self.advance(("close", 0, "", (), TEXT_BOX_CLOSE), char)
        if phase == "after":
            return self.advance(("literal", 0, "", (), TEXT_BOX_SEPARATOR + TEXT_BOX_OPEN), char)
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
    With ``not_found_ids`` the answer may instead be exactly those tokens (the "not found" answer), then eos.
    """

    CHARS = frozenset(TEXT_BOX_OPEN + TEXT_BOX_CLOSE + TEXT_COORD_SEPARATOR + TEXT_BOX_SEPARATOR + "0123456789")

    def __init__(self, token_texts: dict[int, str], eos_token_ids: list[int], assistant_token_id: int | None,
                 num_bins: int, not_found_ids: list[int] | None = None):
        self.token_texts = token_texts  # candidate token id -> its text
        self.candidate_ids = sorted(token_texts)
        self.eos = [int(e) for e in eos_token_ids]
        self.assistant = assistant_token_id
        self.grammar = _TextBoxGrammar(int(num_bins))
        self.not_found = [int(t) for t in not_found_ids or []] if assistant_token_id is not None else []

    @classmethod
    def token_table(cls, tokenizer) -> dict[int, str]:
        """Every token whose text could be part of a text box (made of ``[``, ``]``, ``,``, space and digits)."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return {i: t for i, t in enumerate(texts) if t and set(t) <= cls.CHARS}

    @classmethod
    def from_processor(cls, processor, force_box: bool = False, not_found: bool = False) -> LogitsProcessor:
        tokenizer = processor.tokenizer
        cache = getattr(processor, "_text_box_candidates", None)
        if cache is None:
            cache = processor._text_box_candidates = cls.token_table(tokenizer)
        assistant = tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN) if force_box else None
        not_found_ids = processor.not_found_ids if force_box and not_found else None
        return cls(cache, [tokenizer.eos_token_id], assistant, processor.num_coord_bins, not_found_ids)

    def answer_state(self, row: list[int]):
        """Grammar state after the answer tokens of ``row`` (``None``: off the grammar; ``False``: unconstrained;
        ``("not found", k)``: k tokens of the "not found" answer written)."""
        if self.assistant is None or self.assistant not in row:
            return False
        start = len(row) - row[::-1].index(self.assistant)
        answer = row[start:]
        if self.not_found and answer[:1] == self.not_found[:1]:
            written = len(answer)
            return ("not found", written) if answer == self.not_found[:written] else None
        state = self.grammar.start
        for token in answer:
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
            if state[0] == "not found":
                allowed[row, self.not_found[state[1]] if state[1] < len(self.not_found) else self.eos] = True
                continue
            ok = [t for t in self.candidate_ids if self.grammar.walk(state, self.token_texts[t]) is not None]
            allowed[row, ok] = True
            if state[0] == "after":
                allowed[row, self.eos] = True
            if self.not_found and ids[-1] == self.assistant:  # the first answer token: a box or "not found"
                allowed[row, self.not_found[0]] = True
        return scores.masked_fill(~allowed, float("-inf"))


__all__ = ["BoxConstraintLogitsProcessor", "TextBoxConstraintLogitsProcessor"]
