"""Dense region decoding equals independent `generate` calls; the box grammar never lets an invalid box through."""

import re

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from granvit.box_grammar_granvit import BoxConstraintLogitsProcessor
from granvit.region_decoding_granvit import shared_prefix_length
from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format


def _scene():
    image = Image.new("RGB", (80, 48), "white")
    image.paste(Image.new("RGB", (20, 20), "red"), (10, 10))
    return image


class StopAfterMultipleOf(LogitsProcessor):
    """Forces eos after any generated token id divisible by ``k``: rows stop at different steps, driven by their own
    content, so the same rule applies identically inside `generate` and inside the dense batch."""

    def __init__(self, k: int, eos_token_id: int, prompt_end_token_id: int):
        self.k, self.eos, self.prompt_end = k, eos_token_id, prompt_end_token_id

    def __call__(self, input_ids, scores):
        last = input_ids[:, -1]
        stop = (last % self.k == 0) & (last != self.eos) & (last != self.prompt_end)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos] = 0
        return torch.where(stop.unsqueeze(1), forced, scores)


def _independent(model, processor, image, prompts, max_new_tokens, logits_processor=None):
    """N separate `generate` calls, each trimmed after its first eos (generate pads finished rows)."""
    eos = processor.tokenizer.eos_token_id
    answers = []
    for prompt in prompts:
        batch = processor(images=[image], text=[prompt])
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=logits_processor
        )[0, batch["input_ids"].shape[1] :].tolist()
        answers.append(out[: out.index(eos) + 1] if eos in out else out)
    return answers


def _mixed_prompts(processor):
    # Different suffix lengths (1 word vs a long phrase), a Bbox2Caption prompt (box tokens in the suffix), and a
    # duplicate, which makes the shared prefix the whole prompt minus its last token.
    prompts = [
        processor.caption2bbox_prompt("red"),
        processor.caption2bbox_prompt("the large green square above a yellow star on the left of the picture"),
        processor.bbox2caption_prompt([1, 2, 30, 40], (80, 48)),
        processor.vqa_prompt("what colour is the object on the right"),
    ]
    return prompts + [prompts[0]]


def test_dense_generate_equals_independent_generate(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image, prompts = _scene(), _mixed_prompts(processor)
    ids = processor.prompt_ids(prompts)
    assert len({len(i) for i in ids}) >= 3, "the test needs suffixes of different lengths"
    dense = model.dense_generate(processor, image, prompts, max_new_tokens=10)
    assert dense == _independent(model, processor, image, prompts, 10)
    assert all(len(d) == 10 for d in dense)


def test_rows_stopping_at_different_steps_match(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image, prompts = _scene(), _mixed_prompts(processor)
    eos = processor.tokenizer.eos_token_id
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    varied = 0
    for k in (2, 3, 5, 7, 11):
        stop = LogitsProcessorList([StopAfterMultipleOf(k, eos, assistant)])
        dense = model.dense_generate(processor, image, prompts, max_new_tokens=12, logits_processor=stop)
        assert dense == _independent(model, processor, image, prompts, 12, stop)
        varied += len({len(d) for d in dense}) > 1 and any(d[-1] == eos for d in dense)
    assert varied >= 2, "rows should stop at different steps for several k (the rule depends on the token ids)"


def test_prompt_ids_match_processor_call(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    prompts = _mixed_prompts(processor)
    batch = processor(images=[_scene()] * len(prompts), text=prompts)
    for ids, row, mask in zip(processor.prompt_ids(prompts), batch["input_ids"], batch["attention_mask"]):
        assert ids == row[mask.bool()].tolist()


def test_no_queries_give_no_answers(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    assert model.describe_regions(processor, _scene(), []) == [] and model.ground(processor, _scene(), []) == []


def test_shared_prefix_leaves_each_prompt_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


def test_describe_regions_and_ground_equal_generate(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image = _scene()
    boxes = [[1, 2, 30, 40], [10, 10, 70, 47], [0, 0, 80, 48]]
    captions = model.describe_regions(processor, image, boxes, max_new_tokens=6)
    prompts = [processor.bbox2caption_prompt(b, image.size) for b in boxes]
    expected = _independent(model, processor, image, prompts, 6)
    assert captions == [t.strip() for t in processor.batch_decode(expected, skip_special_tokens=True)]

    phrases = ["red", "a red square near the top left corner of a white picture"]
    constraint = LogitsProcessorList([BoxConstraintLogitsProcessor.from_processor(processor, force_box=True)])
    budget = processor.max_box_tokens + 2
    grounded = model.ground(processor, image, phrases, max_new_tokens=budget)
    prompts = [processor.caption2bbox_prompt(p) for p in phrases]
    expected = _independent(model, processor, image, prompts, budget, constraint)
    assert grounded == processor.post_process_grounding(expected, [image.size] * len(phrases))
    # Forced to start with a box, the untrained model still returns a well-formed box inside the image.
    for boxes_of_phrase in grounded:
        x1, y1, x2, y2 = boxes_of_phrase[0]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 48


def test_dense_needs_the_image_in_the_shared_prefix(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image = _scene()
    prompts = ["<|user|>first<image>" + processor.tokenizer.eos_token, "<|user|>second<image>"]
    with pytest.raises(ValueError, match="<image> token in the prefix"):
        model.dense_generate(processor, image, prompts, max_new_tokens=2)


# ---- constrained box decoding -------------------------------------------------------------------------------------
BOX_TEXT = r"\[(0|[1-9]\d*), (0|[1-9]\d*), (0|[1-9]\d*), (0|[1-9]\d*)\]"


def _check_boxes(processor, tokens, force_box):
    """The generated ``tokens`` hold only well-formed boxes (bins < N, x2 > x1, y2 > y1: positive area), except one
    cut off at the end; returns how many complete boxes they hold."""
    n = processor.num_coord_bins
    if processor.box_format == "text":  # the answer is "[a, b, c, d]" boxes joined by ", ", then eos
        eos = processor.tokenizer.eos_token_id
        ended = eos in tokens
        text = processor.tokenizer.decode(tokens[: tokens.index(eos)] if ended else tokens)
        assert set(text) <= set("[], 0123456789") and text.startswith("["), text
        boxes = [[int(v) for v in m] for m in re.findall(BOX_TEXT, text)]
        if ended:
            assert re.fullmatch(f"{BOX_TEXT}(, {BOX_TEXT})*", text), text
        else:  # complete boxes, then a prefix of one more: at most one unclosed "["
            assert text.count("[") - len(boxes) <= 1 and text.count("]") == len(boxes), text
        assert all(max(b) < n and b[2] > b[0] and b[3] > b[1] for b in boxes), text
        return len(boxes)
    start = processor.coord_token_start_id
    i, complete = 0, 0
    while i < len(tokens):
        t = tokens[i]
        assert not (start <= t < start + n) and t != processor.box_end_token_id, f"stray box token at {i}: {tokens}"
        if t == processor.box_start_token_id:
            body = tokens[i + 1 : i + 6]
            bins = [b - start for b in body[:4]]
            assert all(0 <= b < n for b in bins), tokens
            if len(body) == 5:
                assert body[4] == processor.box_end_token_id, tokens
                complete += 1
            if len(bins) == 4:
                assert bins[2] > bins[0] and bins[3] > bins[1], tokens
            i += 6
        else:
            i += 1
    if force_box:
        assert tokens[0] == processor.box_start_token_id
    return complete


@pytest.mark.parametrize("force_box", [False, True])
def test_constraint_never_yields_an_invalid_box_on_random_logits(tiny_model_and_processor, force_box):
    _, processor = tiny_model_and_processor
    constraint = BoxConstraintLogitsProcessor.from_processor(processor, force_box=force_box)
    prompt = processor.prompt_ids([processor.bbox2caption_prompt([1, 2, 30, 40], (80, 48))])[0]  # holds a box
    if processor.box_format == "text" and not force_box:
        logits = torch.randn((2, len(processor.tokenizer)))  # free text: a text box is ordinary text, nothing to ban
        assert torch.equal(constraint(torch.tensor([prompt] * 2), logits), logits)
        return
    vocab = len(processor.tokenizer)
    boost = [processor.box_start_token_id, processor.box_end_token_id] if processor.box_format == "tokens" else []
    n_boxes = 0
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.tensor([prompt] * 4)
        for _ in range(24):
            logits = torch.randn((4, vocab), generator=generator) * 4
            # Random logits rarely pick <box> on their own: boost it (and </box>) on some seeds to reach the grammar.
            logits[:, boost] += 8.0 * (seed % 2)
            scores = constraint(ids, logits)
            sampled = torch.multinomial(scores.softmax(-1), 1, generator=generator) if seed % 3 else scores.argmax(-1, keepdim=True)
            ids = torch.cat([ids, sampled], dim=1)
        for row in ids[:, len(prompt) :].tolist():
            complete = _check_boxes(processor, row, force_box)
            text = processor.tokenizer.decode(row, skip_special_tokens=True)
            assert len(processor.decode_boxes(text, (80, 48))) == complete
            n_boxes += complete
    assert n_boxes > 100  # the property was exercised on many boxes, not vacuously


def test_constraint_inside_generate(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image = _scene()
    batch = processor(images=[image, image], text=[processor.caption2bbox_prompt("red"), processor.vqa_prompt("hm?")])
    constraint = model.box_constraint(processor, force_box=True)
    budget = processor.max_box_tokens + 8
    out = model.generate(
        **batch, max_new_tokens=budget, do_sample=False, logits_processor=LogitsProcessorList([constraint])
    )[:, batch["input_ids"].shape[1] :]
    for row in out.tolist():
        assert _check_boxes(processor, row, force_box=True) >= 1
    boxes = processor.post_process_grounding(out, [image.size] * 2)
    assert all(len(b) >= 1 for b in boxes)
    free = model.generate(**batch, max_new_tokens=budget, do_sample=False, constrain_boxes=False)
    assert not torch.equal(free[:, batch["input_ids"].shape[1] :], out)  # the constraint changed what the model says


def test_the_preallocated_cache_fits_the_installed_transformers():
    """The fast path is what runs here; if a transformers upgrade breaks it, this test says so (decoding still works)."""
    from granvit import region_decoding_granvit as rd

    assert rd.preallocated_cache_works()


@pytest.fixture
def changed_cache_internals(monkeypatch):
    """A transformers whose DynamicLayer no longer reads what PreallocatedKVLayer sets (simulated: its sequence length
    comes out wrong), so the self-check must fail and send dense decoding down the public DynamicCache path."""
    from granvit import region_decoding_granvit as rd
    from transformers import DynamicCache

    repeats = []
    original = DynamicCache.batch_repeat_interleave
    monkeypatch.setattr(rd.PreallocatedKVLayer, "get_seq_length", lambda self: 0)
    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", lambda self, n: repeats.append(n) or original(self, n))
    rd.preallocated_cache_works.cache_clear()
    yield repeats
    rd.preallocated_cache_works.cache_clear()


def test_fallback_path_gives_the_same_tokens(tiny_model_and_processor, changed_cache_internals):
    from granvit import region_decoding_granvit as rd

    model, processor = tiny_model_and_processor
    image, prompts = _scene(), _mixed_prompts(processor)
    fast = _independent(model, processor, image, prompts, 6)  # what the fast path was checked against above
    assert not rd.preallocated_cache_works()
    changed_cache_internals.clear()  # the self-check's own DynamicCache
    assert model.dense_generate(processor, image, prompts, max_new_tokens=6) == fast
    assert changed_cache_internals == [len(prompts)]  # the N rows came from DynamicCache.batch_repeat_interleave
    boxes = [[1, 2, 30, 40], [10, 10, 70, 47]]
    expected = [t.strip() for t in processor.batch_decode(
        _independent(model, processor, image, [processor.bbox2caption_prompt(b, image.size) for b in boxes], 6),
        skip_special_tokens=True)]
    assert model.describe_regions(processor, image, boxes, max_new_tokens=6) == expected
