"""The embedded pretrained parts: the LM's corpus says what it should, `granvit-parts` makes Hub-format folders with a
parts.json that loading checks, granvit-build keeps what the LM learned, and the shipped parts match their recipe."""

import json
import random

import pytest
import torch
from granvit.box_codec_granvit import BoxCodec, coord_token
from granvit.console import UserError
from granvit.train.data.synth import SynthConfig, generate_record
from granvit.train.parts import PARTS_CONFIG, SHIPPED_DIR, load_parts_recipe, part_hash, shipped_part
from granvit.train.parts import cli as parts_cli
from granvit.train.parts.corpus import CAPTION_WORDS, scene_document, single_question
from granvit.train.parts.lm import Documents

TEMPLATES = {"bbox2caption": "describe {box}", "caption2bbox": "find {caption}"}
SYNTH = SynthConfig(image_size=128, min_objects=2, max_objects=3, object_size=(0.3, 0.6), allow_duplicates=False,
                    relations=False, ocr_fraction=0.0, textures=("solid",))


def scene(i=0):
    return generate_record(SYNTH, 1000, "train", i)


@pytest.mark.parametrize("box_format", ["tokens", "text"])
def test_scene_document_asks_every_object_both_ways_and_its_answers_are_in_the_scene(box_format):
    record, codec = scene(3), BoxCodec(32, box_format)
    segments = scene_document(record, codec, TEMPLATES, random.Random(0))
    assert [role for _, role in segments[:2]] == ["text", "scene"]  # <|user|>, then the written scene
    written = segments[1][0]
    assert written.startswith("scene: ") and written.endswith(".")
    questions, answers = segments[2::2], segments[3::2]
    assert {role for _, role in questions} == {"text"} and {role for _, role in answers} == {"answer"}
    assert len(answers) == 2 * len(record["regions"])  # every object, both ways
    size = (record["width"], record["height"])
    truth = {codec.encode(r["bbox"], size): r["caption"] for r in record["regions"]}
    for (asked, _), (answer, _) in zip(questions, answers):
        answer = answer.removesuffix("<|endoftext|>")
        asked = asked.removeprefix(" ").removeprefix("<|user|>").removesuffix("<|endoftext|><|assistant|>")
        if asked.startswith("describe "):
            box = asked.removeprefix("describe ")
            assert truth[box] == answer and f"{box} {answer}" in written  # the caption written after that box
        else:
            caption = asked.removeprefix("find ")
            assert truth[answer] == caption and f"{answer} {caption}" in written


def test_random_captions_are_distinct_word_strings_that_only_the_context_answers():
    record = scene(5)
    segments = scene_document(record, BoxCodec(32, "tokens"), TEMPLATES, random.Random(1), random_captions=True)
    written = segments[1][0].removeprefix("scene: ").removesuffix(".")
    captions = [entry.split("</box> ", 1)[1] for entry in written.split("; ")]
    assert len(set(captions)) == len(captions) == len(record["regions"])
    assert all(set(c.split()) <= set(CAPTION_WORDS) for c in captions)
    assert sorted(captions) != sorted(r["caption"] for r in record["regions"])


def test_shuffled_words_keep_each_caption_s_words_and_the_questions_keep_their_order():
    record = scene(6)
    plain = scene_document(record, BoxCodec(32, "tokens"), TEMPLATES, random.Random(2))
    shuffled = scene_document(record, BoxCodec(32, "tokens"), TEMPLATES, random.Random(2), shuffled_words=True)
    assert plain[2:] == shuffled[2:]  # the same questions and answers
    entries = [e.split("</box> ", 1)[1] for e in shuffled[1][0].removeprefix("scene: ").removesuffix(".").split("; ")]
    assert sorted(sorted(e.split()) for e in entries) == sorted(sorted(r["caption"].split()) for r in record["regions"])


def test_segments_tokenize_as_the_whole_document_does():
    """The scene is its own segment (for the noise mask) without changing a token: BPE splits at its ends anyway."""
    from granvit.train.parts.training import train_part_tokenizer

    recipe = load_parts_recipe(PARTS_CONFIG).lm
    records = [scene(i) for i in range(40)]
    documents = Documents(records, recipe, None, 40, seed=0)
    texts = ["".join(text for text, _ in documents.segments(i)) for i in range(40)]
    documents.tokenizer = train_part_tokenizer([BoxCodec().strip_box_tokens(t) for t in texts], 300,
                                               BoxCodec(32, "tokens").added_tokens())
    for i in range(40):
        ids, labels, scene_mask = documents[i]
        assert ids == documents.tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        assert len(scene_mask) == len(ids) and (sum(scene_mask) > 0) == (len(documents.segments(i)) > 1)


def test_held_out_question_is_one_turn_right_after_the_scene():
    prompt, answer = single_question(scene(2), BoxCodec(32, "tokens"), TEMPLATES, "bbox2caption", random.Random(0))
    assert prompt.startswith("<|user|>scene: ") and prompt.endswith("<|endoftext|><|assistant|>")
    assert prompt.count("<|user|>") == 1 and answer in prompt


def test_documents_are_a_function_of_their_index():
    recipe = load_parts_recipe(PARTS_CONFIG).lm
    records = [scene(i) for i in range(4)]
    a, b = Documents(records, recipe, None, 16, seed=0), Documents(records, recipe, None, 16, seed=0)
    assert [a.segments(i) for i in (0, 7, 15)] == [b.segments(i) for i in (0, 7, 15)]
    assert a.segments(0) != a.segments(4)  # the same scene, visited again, is written and asked anew


@pytest.fixture(scope="module")
def smoke_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts")
    assert parts_cli.main(["--smoke", "--out", str(out), "--work", str(out / "work"), "--set", "parallel=false"]) == 0
    return out


def test_parts_command_writes_hub_folders_and_a_manifest(smoke_parts):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((smoke_parts / "parts.json").read_text())
    recipe = load_parts_recipe(PARTS_CONFIG, parts_cli.SMOKE + ["parallel=false"])
    for name in ("siglip", "lm"):
        entry = manifest["parts"][name]
        assert entry["hash"] == part_hash(name, recipe) and entry["bytes"] > 0 and entry["seconds"] > 0
    assert {"retrieval_top1", "probe_shape_acc", "probe_colour_acc"} <= set(manifest["parts"]["siglip"]["figures"])
    lm_figures = manifest["parts"]["lm"]["figures"]
    assert {"perplexity", "bbox2caption_exact_tokens", "caption2bbox_exact_tokens", "text_task_exact"} <= set(lm_figures)
    assert manifest["parts"]["lm"]["command"].startswith("granvit-parts --smoke") and not (smoke_parts / "work").exists()
    lm_report = json.loads((smoke_parts / "lm" / "part_report.json").read_text())
    assert len(lm_report["loss_curve"]) == round(recipe.lm.steps * recipe.lm.trained_share) == 1  # 0.6 of 2 steps
    assert type(AutoModel.from_pretrained(smoke_parts / "siglip")).__name__ == "SiglipModel"
    assert type(AutoModelForCausalLM.from_pretrained(smoke_parts / "lm")).__name__ == "Qwen2ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(smoke_parts / "lm")
    ids = tokenizer.convert_tokens_to_ids([coord_token(i) for i in range(32)])
    assert ids == list(range(ids[0], ids[0] + 32))  # contiguous, as the processor requires
    assert tokenizer.convert_tokens_to_ids("<|user|>") != tokenizer.unk_token_id


def test_build_keeps_the_lm_part_box_rows_and_refuses_other_bins(smoke_parts):
    from granvit.train.build import build_granvit
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(smoke_parts / "lm")
    model, processor = build_granvit(str(smoke_parts / "siglip"), str(smoke_parts / "lm"), num_coord_bins=32)
    start = processor.coord_token_start_id
    rows = model.get_input_embeddings().weight[start:start + 32]
    assert torch.equal(rows, lm.get_input_embeddings().weight[start:start + 32])  # not re-initialised
    assert build_granvit(str(smoke_parts / "siglip"), str(smoke_parts / "lm"))[1].num_coord_bins == 32  # the LM's own
    with pytest.raises(UserError, match="already has 32 coordinate tokens.*num_coord_bins=32"):
        build_granvit(str(smoke_parts / "siglip"), str(smoke_parts / "lm"), num_coord_bins=100)


def test_loading_refuses_parts_of_another_recipe(smoke_parts, tmp_path, capsys):
    changed = tmp_path / "parts.yaml"
    changed.write_text(PARTS_CONFIG.read_text().replace("seed: 0", "seed: 1", 1))
    with pytest.raises(UserError, match="trained from another recipe.*retrain the parts with `granvit-parts`"):
        shipped_part("lm", root=smoke_parts, recipe_path=changed)
    assert parts_cli.main(["--check", "--out", str(smoke_parts), "--config", str(changed)]) == 1
    assert "stale: retrain it" in capsys.readouterr().out


def test_shipped_parts_match_their_recipe_and_meet_their_targets():
    """What the repository ships was trained from train/configs/parts.yaml, and is good enough for stage 1."""
    assert parts_cli.check(SHIPPED_DIR, PARTS_CONFIG) == 0
    figures = {name: shipped_part(name)[1]["figures"] for name in ("siglip", "lm")}
    # the 0.90 on both tasks is not reached by the LM stage 1 can steer (EXPERIMENTS.md, section 2)
    assert figures["lm"]["bbox2caption_exact_tokens"] >= 0.8 and figures["lm"]["caption2bbox_exact_tokens"] >= 0.75
    assert figures["siglip"]["probe_shape_acc"] >= 0.6
    assert figures["siglip"]["retrieval_top1"] >= 0.8
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert total <= 64 * 2**20
