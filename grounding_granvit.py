"""Grounding answers users can trust: the box grammar inside plain ``generate``, a score per box, and "not found".

- ``GroundingRequestGrammar``: what ``model.generate`` adds on its own (modeling_granvit.py), so that
  ``pipeline("image-text-to-text")`` and any ``generate`` caller decode a grounding request under the box grammar of
  the checkpoint's box format. It reads which rows are grounding requests from their prompt tokens (the checkpoint's
  Caption2Bbox template around a caption, as every entry point writes it: processing_granvit.py) and leaves the other
  rows alone. It needs no processor: ``grounding_settings`` puts what it needs (token ids, and for the text box format
  the tokens a text box can be made of) into the checkpoint's ``generation_config.granvit_grounding`` when the
  checkpoint is saved (``model.configure_grounding(processor)``).
- ``box_scores``: a score in [0, 1] for each box of an answer, from the probabilities its tokens had under the
  grammar while it was decoded: p(the box's first token) x the geometric mean of p(its other tokens). The first token
  decides whether there is a(nother) box at all, against "not found" or the end of the answer; the others where it is
  (the geometric mean keeps boxes of 6 tokens and text boxes of ~15-20 comparable). Not calibrated: use it to rank, or
  with a threshold chosen on held-out data (experiments/grounding_scores.py).
- "not found" (our deviation: the paper has no negatives): a checkpoint trained with the ``caption2bbox_negative`` task
  (train/data/tasks.py: a caption that names nothing in the image -> ``processor.not_found_answer``) may answer it, so
  its grammar allows either boxes or exactly that answer. Checkpoints trained without it keep the paper's grammar
  (always a box): they never learned the answer.

A Hub file: it ships in every checkpoint and imports only torch, transformers and the other Hub files.
"""

import bisect
import itertools
import math

import torch
from transformers import LogitsProcessor

from .box_grammar_granvit import BoxConstraintLogitsProcessor, TextBoxConstraintLogitsProcessor
from .prompts_granvit import ASSISTANT_TOKEN, USER_TOKEN

NEGATIVE_TASK = "caption2bbox_negative"  # the training task whose answer is "not found" (train/data/tasks.py)


def grounding_settings(processor, not_found: bool) -> dict | None:
    """What ``GroundingRequestGrammar`` needs, as JSON-ready values (``generation_config.granvit_grounding``); None
    when the Caption2Bbox template is a bare ``{caption}`` (every prompt would look like a grounding request).

    The template's text before and after ``{caption}`` as token ids, tokenized where the prompt has them: the prefix
    right after a special token (``<image>``), the suffix at the start of a piece followed by eos (the caption is
    tokenized apart as untrusted text, processing_granvit.py)."""
    prefix, _, suffix = processor.caption2bbox_template.partition("{caption}")
    if not (prefix or suffix):
        return None
    tokenizer = processor.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    settings = {
        "box_format": processor.box_format,
        "num_coord_bins": processor.num_coord_bins,
        "user_token_id": tokenizer.convert_tokens_to_ids(USER_TOKEN),
        "assistant_token_id": tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN),
        "image_token_id": processor.image_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "request_prefix_ids": ids(USER_TOKEN + prefix)[1:] if prefix else [],
        "request_suffix_ids": ids(suffix + ASSISTANT_TOKEN)[:-1] if suffix else [],
        "not_found_ids": processor.not_found_ids if not_found else None,
    }
    if processor.box_format == "tokens":
        settings.update(box_start_token_id=processor.box_start_token_id, box_end_token_id=processor.box_end_token_id,
                        coord_token_start_id=processor.coord_token_start_id)
    else:
        table = TextBoxConstraintLogitsProcessor.token_table(tokenizer)
        settings["text_box_tokens"] = {str(i): text for i, text in table.items()}
    return settings


class GroundingRequestGrammar(LogitsProcessor):
    """The box grammar (the answer forced to be boxes, or "not found" where the checkpoint learned it) on the rows
    whose prompt is a grounding request; every other row is left as it is.

    A row is a grounding request when its last user turn (the text after its last image token, or after ``<|user|>``
    without an image) is the template's prefix, a caption, the template's suffix, then eos and ``<|assistant|>``.
    Pads (and eos, which pads here) are skipped, so left-padded ``generate`` batches and the dense APIs' right-aligned
    suffixes (region_decoding_granvit.py) read the same.
    """

    def __init__(self, settings: dict):
        self.prefix, self.suffix = list(settings["request_prefix_ids"]), list(settings["request_suffix_ids"])
        self.user, self.assistant = settings["user_token_id"], settings["assistant_token_id"]
        self.image = settings["image_token_id"]
        self.skip = {settings["eos_token_id"], settings["pad_token_id"]} - {None}
        eos, not_found = settings["eos_token_id"], settings.get("not_found_ids")
        if settings["box_format"] == "tokens":
            self.grammar = BoxConstraintLogitsProcessor(
                settings["box_start_token_id"], settings["box_end_token_id"], settings["coord_token_start_id"],
                settings["num_coord_bins"], force_box_after_token_id=self.assistant, not_found_ids=not_found,
                eos_token_id=eos,
            )
        else:
            table = {int(i): text for i, text in settings["text_box_tokens"].items()}
            self.grammar = TextBoxConstraintLogitsProcessor(table, [eos], self.assistant, settings["num_coord_bins"],
                                                            not_found)

    def is_request(self, row: list[int]) -> bool:
        """Whether the last turn of ``row`` (prompt, then what was generated so far) asks for a box."""
        if self.assistant not in row:
            return False
        answer_start = len(row) - row[::-1].index(self.assistant)
        turn = row[: answer_start - 1]
        if self.user not in turn:
            return False
        start = len(turn) - turn[::-1].index(self.user)
        images = [k for k in range(start, len(turn)) if turn[k] == self.image]
        text = [t for t in turn[images[-1] + 1 if images else start :] if t not in self.skip]
        caption = len(text) - len(self.prefix) - len(self.suffix)
        ends = text[: len(self.prefix)], text[len(text) - len(self.suffix) :]
        return caption >= 1 and ends == (self.prefix, self.suffix)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (batch, seq) prompt + generated so far; scores: (batch, vocab) next-token logits.
        rows = [i for i, row in enumerate(input_ids.tolist()) if self.is_request(row)]
        if not rows:
            return scores
        index = torch.tensor(rows, device=scores.device)
        return scores.index_copy(0, index, self.grammar(input_ids[index], scores[index]))


def chosen_logprobs(step_scores, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the chosen tokens under the distributions they were drawn from: ``step_scores`` a sequence
    of (batch, vocab) processed scores (``generate(output_scores=True).scores``, grammar masks included), ``tokens``
    (batch, steps) the generated ids. Returns (batch, steps)."""
    logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in step_scores], dim=1)  # (batch, steps, vocab)
    return logprobs.gather(2, tokens[:, : logprobs.shape[1]].unsqueeze(2)).squeeze(2)


def box_scores(processor, answer_ids: list[int], logprobs: list[float]) -> list[float]:
    """One score per well-formed box of an answer, in the order ``processor.post_process_grounding`` returns them.

    ``logprobs[k]``: log p(answer_ids[k]) under the distribution it was decoded from. A box's tokens run from the token
    after the previous box (or the answer's first token) to the one closing it; its score is p(first of them) x the
    geometric mean of p(the others)."""
    pieces = [processor.decode([token], skip_special_tokens=True) for token in answer_ids]
    ends = list(itertools.accumulate(len(p) for p in pieces))  # character offset after each token
    scores, first = [], 0
    for match in processor.box_pattern.finditer("".join(pieces)):
        last = bisect.bisect_left(ends, match.end())  # the token holding the box's last character
        if not processor.decode_boxes(match.group(0), (1, 1)):  # not a box post_process_grounding would return
            continue
        span = [float(v) for v in logprobs[first : last + 1]]
        scores.append(math.exp(span[0] + sum(span[1:]) / max(len(span) - 1, 1)))
        first = last + 1
    return scores


__all__ = ["GroundingRequestGrammar", "NEGATIVE_TASK", "box_scores", "chosen_logprobs", "grounding_settings"]
