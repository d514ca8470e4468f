"""Grounding answers users can trust: plain `generate` decodes grounding requests under the box grammar by itself, every
box has a score (the same from `model.ground`, `generate` and granvit-eval), and a checkpoint that learned it can
answer "not found" (the fresh-process pipeline test is in test_grounding_pipeline.py)."""

import copy
import math

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, pipeline

from granvit.box_grammar_granvit import BoxConstraintLogitsProcessor
from granvit.eval import metrics as M
from granvit.eval.run import evaluate_synthetic, predict
from granvit.grounding_granvit import NEGATIVE_TASK, box_scores, chosen_logprobs
from conftest import every_box_format, load_tiny
from test_region_decoding import _check_boxes

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format

PHRASES = ["red", "a red square near the top left corner"]


def _scene():
    image = Image.new("RGB", (80, 48), "white")
    image.paste(Image.new("RGB", (20, 20), "red"), (10, 10))
    return image


def _typed(processor, phrase):
    """A grounding request as a user types it (no prompt builder)."""
    return processor.caption2bbox_template.replace("{caption}", phrase)


def _answer(row, eos):
    return row[: row.index(eos) + 1] if eos in row else row


class BoostFirstAnswerToken(LogitsProcessor):
    """Makes ``token`` the model's favourite first answer token (a stand-in for a model that learned to say it)."""

    def __init__(self, token: int, assistant: int):
        self.token, self.assistant = token, assistant

    def __call__(self, input_ids, scores):
        first = input_ids[:, -1] == self.assistant
        boost = torch.zeros_like(scores)
        boost[:, self.token] = 100.0
        return scores + boost * first.unsqueeze(1)


@pytest.fixture(scope="module")
def negatives_model(tiny_checkpoint):
    """The tiny checkpoint as if trained with the caption2bbox_negative task (its grammar then allows "not found")."""
    model, processor = load_tiny(tiny_checkpoint)
    model.config.trained_tasks = ["bbox2caption", "caption2bbox", NEGATIVE_TASK]
    model.configure_grounding(processor)
    return model, processor


# ---- the grammar with "not found" --------------------------------------------------------------------------------
def test_answers_are_boxes_or_exactly_not_found_on_random_logits(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    grammar = BoxConstraintLogitsProcessor.from_processor(processor, force_box=True, not_found=True)
    eos, nf = processor.tokenizer.eos_token_id, processor.not_found_ids
    prompt = processor.prompt_ids([processor.caption2bbox_prompt("red")])[0]
    vocab, kinds = len(processor.tokenizer), {"box": 0, "not found": 0}
    for seed in range(60):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.tensor([prompt] * 4)
        for _ in range(max(processor.max_box_tokens, len(nf)) + 2):
            logits = torch.randn((4, vocab), generator=generator) * 4
            logits[:, nf[0]] += 6.0 * (seed % 2)  # half the seeds lean towards "not found"
            scores = grammar(ids, logits)
            ids = torch.cat([ids, torch.multinomial(scores.softmax(-1), 1, generator=generator)], dim=1)
        for row in ids[:, len(prompt):].tolist():
            if row[0] == nf[0]:
                assert _answer(row, eos) == nf + [eos]  # the whole answer, then the end
                kinds["not found"] += 1
            else:
                assert _check_boxes(processor, _answer(row, eos), force_box=True) >= 1 or eos not in row
                kinds["box"] += 1
    assert min(kinds.values()) > 20, kinds  # both answers were exercised


def test_without_negatives_the_grammar_never_says_not_found(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    assert not model.grounds_not_found
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    boost = BoostFirstAnswerToken(processor.not_found_ids[0], assistant)
    [found] = model.ground(processor, _scene(), ["a dog"], logits_processor=LogitsProcessorList([boost]),
                           return_scores=True)
    assert len(found["boxes"]) >= 1  # the paper's grammar: always a box


def test_a_model_that_says_not_found_is_answered_not_found_everywhere(negatives_model):
    model, processor = negatives_model
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    boost = LogitsProcessorList([BoostFirstAnswerToken(processor.not_found_ids[0], assistant)])
    assert model.ground(processor, _scene(), PHRASES, logits_processor=boost, return_scores=True) == [
        {"boxes": [], "scores": []}] * 2
    # generate (and so pipeline("image-text-to-text")) by itself: the request grammar finishes the answer
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": _scene()},
                                             {"type": "text", "text": _typed(processor, "a dog")}]}]
    [out] = pipe(text=messages, max_new_tokens=12, return_full_text=False, generate_kwargs={"logits_processor": boost})
    assert processor.is_not_found(out["generated_text"]) and out["generated_text"] == processor.not_found_answer
    # left alone, the same model still boxes: "not found" is an option, not a bias
    assert all(len(b) >= 1 for b in model.ground(processor, _scene(), PHRASES))


def test_configure_grounding_records_what_the_model_learned(tiny_model_and_processor, negatives_model, tmp_path):
    from granvit.train.build import save_granvit

    model, processor = tiny_model_and_processor
    assert model.generation_config.granvit_grounding["not_found_ids"] is None
    trained, _ = negatives_model
    assert trained.generation_config.granvit_grounding["not_found_ids"] == processor.not_found_ids
    # saving rewrites the settings from the model's trained tasks (never stale)
    stale = copy.deepcopy(trained)
    stale.generation_config.granvit_grounding = None
    reloaded, _ = load_tiny(save_granvit(stale, processor, tmp_path / "ckpt"))
    assert reloaded.generation_config.granvit_grounding == trained.generation_config.granvit_grounding


# ---- the request grammar inside generate ---------------------------------------------------------------------------
def test_request_grammar_constrains_grounding_rows_only(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    grammar = model.request_grammar()
    prompts = [_typed(processor, "red"), processor.vqa_prompt("find red"), processor.bbox2caption_prompt(
        [1, 2, 30, 40], (80, 48)), processor.caption2bbox_prompt("a red square")]
    rows = processor.prompt_ids(prompts)
    assert [grammar.is_request(r) for r in rows] == [True, False, False, True]
    # a dense-decoding row (right-aligned: pads between the shared prefix and the rest) reads the same
    split = rows[0].index(processor.image_token_id) + processor.num_image_tokens
    pad = processor.tokenizer.pad_token_id
    assert grammar.is_request(rows[0][:split] + [pad] * 3 + rows[0][split:])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded, as in generate
    logits = torch.randn((4, len(processor.tokenizer)), generator=torch.Generator().manual_seed(0))
    out = grammar(ids, logits.clone())
    explicit = BoxConstraintLogitsProcessor.from_processor(processor, force_box=True)(ids, logits.clone())
    for k, request in enumerate([True, False, False, True]):
        assert torch.equal(out[k], explicit[k] if request else logits[k])


def test_generate_grounds_under_the_grammar_by_itself(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image, eos = _scene(), processor.tokenizer.eos_token_id
    budget = processor.max_box_tokens + 4
    prompts = [_typed(processor, "red"), processor.vqa_prompt("what is it?")]
    batch = processor(images=[image, image], text=prompts)
    auto = model.generate(**batch, max_new_tokens=budget, do_sample=False)[:, batch["input_ids"].shape[1]:].tolist()

    def alone(prompt, **kwargs):
        single = processor(images=[image], text=[prompt])
        out = model.generate(**single, max_new_tokens=budget, do_sample=False, **kwargs)
        return _answer(out[0, single["input_ids"].shape[1]:].tolist(), eos)

    grammar = LogitsProcessorList([model.box_constraint(processor, force_box=True)])
    assert _answer(auto[0], eos) == alone(prompts[0], logits_processor=grammar, constrain_boxes=False)
    assert _answer(auto[1], eos) == alone(prompts[1], constrain_boxes=False)  # not a grounding request: untouched
    assert _check_boxes(processor, _answer(auto[0], eos), force_box=True) >= 1
    # the dense APIs decode the same way
    assert model.dense_generate(processor, image, [prompts[0]], max_new_tokens=budget)[0] == _answer(auto[0], eos)


# ---- scores --------------------------------------------------------------------------------------------------------
def test_box_scores_known_answer(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    tok = processor.tokenizer
    two = processor.encode_boxes([[10, 10, 20, 20], [30, 30, 40, 40]], (100, 100))
    ids = tok(two, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logprobs = [-0.01 * (k + 1) for k in range(len(ids))]
    closing = [k for k, i in enumerate(ids) if tok.decode([i]).endswith(("</box>", "]"))]
    first_end, second_end = closing

    def expected(span):
        return math.exp(span[0] + sum(span[1:]) / (len(span) - 1))

    assert box_scores(processor, ids, logprobs) == pytest.approx(
        [expected(logprobs[: first_end + 1]), expected(logprobs[first_end + 1: second_end + 1])])
    assert box_scores(processor, ids, [0.0] * len(ids)) == [1.0, 1.0]  # certain tokens: score 1
    not_found = tok(processor.not_found_answer, add_special_tokens=False)["input_ids"]
    assert box_scores(processor, not_found, [0.0] * len(not_found)) == []


def test_ground_scores_equal_generate_scores(tiny_model_and_processor):
    """The dense path and batched generate give each box the same score (and the same box)."""
    model, processor = tiny_model_and_processor
    image = _scene()
    grounded = model.ground(processor, image, PHRASES, return_scores=True)
    budget = 2 * processor.max_box_tokens + 4
    for phrase, found in zip(PHRASES, grounded):
        batch = processor(images=[image], text=[processor.caption2bbox_prompt(phrase)])
        out = model.generate(**batch, max_new_tokens=budget, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        logprobs = chosen_logprobs(out.scores, new)[0].tolist()
        assert processor.post_process_grounding(new, [image.size])[0] == found["boxes"]
        assert box_scores(processor, new[0].tolist(), logprobs) == pytest.approx(found["scores"], rel=1e-4)
        assert all(0.0 < s <= 1.0 for s in found["scores"])


def test_eval_keeps_the_score_of_its_box(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    image = _scene()
    samples = [{"id": str(k), "image": image, "expression": p, "box": [10.0, 10.0, 30.0, 30.0]}
               for k, p in enumerate(PHRASES)]
    records = predict(model, processor, samples, "grounding", unconstrained=False)
    grounded = model.ground(processor, image, PHRASES, max_new_tokens=processor.max_box_tokens + 1, return_scores=True)
    for rec, found in zip(records, grounded):
        assert rec["box"] == found["boxes"][0] and rec["score"] == pytest.approx(found["scores"][0], rel=1e-4)


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    for n in (5, 40):
        scores = torch.randint(0, 6, (n,), generator=generator).tolist()  # many ties
        labels = [s + torch.randint(-2, 3, (1,), generator=generator).item() > 2 for s in scores]
        if 0 < sum(labels) < n:
            assert M.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert M.auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0 and M.auroc([0.1, 0.9], [True, False]) == 0.0
    assert M.auroc([0.5, 0.5], [True, True]) is None


def test_evaluate_synthetic_reports_the_score_auroc(tiny_model_and_processor):
    from datasets import Dataset

    model, processor = tiny_model_and_processor
    image = _scene()
    rows = Dataset.from_list([{"image_id": "a", "image": image, "width": 80, "height": 48,
                               "regions": [{"bbox": [10.0, 10.0, 30.0, 30.0], "caption": "red square"},
                                           {"bbox": [40.0, 5.0, 79.0, 47.0], "caption": "white"}]}])
    out = evaluate_synthetic(model, processor, rows, unconstrained=False, baselines=False)
    assert out["grounding_not_found"] == 0.0  # the paper's grammar: every answer a box
    assert out["grounding_score_auroc"] is None or 0.0 <= out["grounding_score_auroc"] <= 1.0
