"""`granvit-data convert --from llava`: a hand-made file in LLaVA's layout becomes trl conversation rows with the
checkpoint's box format (through its own codec), unparseable rows stop it with one line naming file, row and turn,
and a smoke SFT run trains on the rows."""
import json
import os

import pytest
import torch
from datasets import load_dataset
from PIL import Image

from granvit import GranViTForConditionalGeneration, GranViTProcessor
from granvit.train.data.cli import main
from granvit.train.data.conversations import sft_items
from granvit.train.data.convert_llava import convert_llava
from granvit.train.data.tasks import TaskBuilder
from granvit.train.freezing import component_of
from granvit.train.trl_stages import ConversationCollator, GranViTSFTConfig, GranViTSFTTrainer

SIZES = {"coco/1.jpg": (64, 48), "vg/2.png": (80, 64), "ocr/3.jpg": (64, 64)}
ROWS = [
    {"id": "ref-1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence "
                                   "describes: the dog on the left."},
        {"from": "gpt", "value": "[0.25, 0.5, 0.75, 1.0]"}]},
    {"id": "reg-2", "image": "vg/2.png", "conversations": [
        {"from": "human", "value": "What is in [0.1, 0.125, 0.5, 0.5]?\n<image>"},
        {"from": "gpt", "value": "A red sign that says <box> stop."},
        {"from": "human", "value": "Anything else?"},
        {"from": "gpt", "value": "No."}]},
    {"id": "chat-3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},  # no image
    {"id": "gone-4", "image": "coco/missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "ocr-5", "image": "ocr/3.jpg", "conversations": [
        {"from": "human", "value": "<image>\nRead the text."}, {"from": "gpt", "value": "OPEN 24 hours"}]},
]


@pytest.fixture
def llava(tmp_path):
    for name, size in SIZES.items():
        os.makedirs(tmp_path / "images" / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", size, (90, 120, 200)).save(tmp_path / "images" / name)
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(ROWS))
    return tmp_path, str(path)


def processor_of(checkpoint):
    return GranViTProcessor.from_pretrained(checkpoint)


@pytest.mark.parametrize("box_format", ["text", "tokens"])
def test_llava_rows_become_conversations_in_the_checkpoint_box_format(tiny_checkpoints, llava, box_format, capsys):
    tmp_path, path = llava
    checkpoint = tiny_checkpoints(box_format)
    processor = processor_of(checkpoint)
    out = str(tmp_path / "sft")
    assert main(["convert", "--from", "llava", out, "--inputs", path, "--images", str(tmp_path / "images"),
                 "--box-convention", "normalized", "--checkpoint", checkpoint]) == 0
    counts = json.loads(open(os.path.join(out, "counts-train.json")).read())
    assert counts["written"] == 3 and counts["skipped"] == {"no_image": 1} and counts["broken"] == {"missing_image": 1}
    rows = {r["id"]: r for r in load_dataset(out, split="train")}
    plain = processor.plain_text
    ref = rows["ref-1"]
    assert ref["images"][0].size == (64, 48)
    assert ref["messages"] == [
        {"role": "user", "content": plain("Please provide the bounding box coordinate of the region this sentence "
                                          "describes: the dog on the left.")},
        {"role": "assistant", "content": processor.encode_box([16.0, 24.0, 48.0, 48.0], (64, 48))}]
    reg = rows["reg-2"]["messages"]
    assert reg[0]["content"] == plain("What is in ") + processor.encode_box([8.0, 8.0, 40.0, 32.0], (80, 64)) + plain("?")
    assert [m["role"] for m in reg] == ["user", "assistant", "user", "assistant"]
    assert reg[1]["content"] == plain("A red sign that says <box> stop.")

    # tokenized as the SFT stage tokenizes: the box is the codec's tokens, a "<box>" in the source's text stays text
    batch = ConversationCollator(processor=processor)([{"images": rows["reg-2"]["images"], "messages": reg}])
    ids = batch["input_ids"][0].tolist()
    box_ids = processor.tokenizer(processor.encode_box([8.0, 8.0, 40.0, 32.0], (80, 64)), add_special_tokens=False)["input_ids"]
    assert any(ids[i : i + len(box_ids)] == box_ids for i in range(len(ids)))
    if box_format == "tokens":
        box_start = processor.tokenizer.convert_tokens_to_ids("<box>")
        assert ids.count(box_start) == 1  # the real box only
    labelled = processor.tokenizer.decode([t for t, lab in zip(ids, batch["labels"][0].tolist()) if lab != -100])
    assert "A red sign that says <box> stop." in labelled and "No." in labelled and "Anything" not in labelled
    assert main(["validate", out]) == 0


def test_llava_box_conventions_and_jsonl(tiny_checkpoints, llava):
    """0-999 (bin = floor(v x 1000), read back at the bin centre) and pixels give the same boxes as normalized when
    they name the same place; JSONL reads as JSON."""
    tmp_path, _ = llava
    checkpoint = tiny_checkpoints("text")
    processor = processor_of(checkpoint)
    answers = {"normalized": "[0.25, 0.5, 0.75, 1.0]", "0-999": "[250, 500, 750, 999]", "pixels": "[16, 24, 48, 48]"}
    written = {}
    for convention, answer in answers.items():
        row = dict(ROWS[0], conversations=[ROWS[0]["conversations"][0], {"from": "gpt", "value": answer}])
        path = tmp_path / f"{convention}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        out = str(tmp_path / convention)
        convert_llava([str(path)], out, str(tmp_path / "images"), box_convention=convention, checkpoint=checkpoint)
        written[convention] = load_dataset(out, split="train")[0]["messages"][1]["content"]
    bins = processor.box_to_bins([16.0, 24.0, 48.0, 48.0], (64, 48))
    assert written == {k: processor.format_bins(bins) for k in answers}
    assert written["0-999"] == processor.format_bins([25, 50, 75, 99])  # 1000 bins -> the checkpoint's 100
    # none: the text stays as it is; no checkpoint needed
    out = str(tmp_path / "none")
    convert_llava([str(tmp_path / "normalized.jsonl")], out, str(tmp_path / "images"), box_convention="none")
    assert load_dataset(out, split="train")[0]["messages"][1]["content"] == processor.plain_text(answers["normalized"])


@pytest.mark.parametrize("turns, convention, message", [
    ([{"from": "bot", "value": "hi"}], "normalized", r"row 0 \(id bad\), turn 0: unknown role 'bot'"),
    ([{"from": "human"}], "normalized", r"row 0 \(id bad\), turn 0 is not \{\"from\": ..., \"value\": \"text\"\}"),
    ([{"from": "gpt", "value": "[0.1, 0.2, 1.5, 0.9]"}], "normalized", r"turn 0: \[0.1, 0.2, 1.5, 0.9\] is not a normalized box"),
    ([{"from": "gpt", "value": "[10, 20, 500.5, 900]"}], "0-999", r"is not a 0-999 box"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "[1, 2, 3, 4]"}], None,
     r"row 0 \(id bad\), turn 1 holds a box \[1, 2, 3, 4\]; say how the source writes boxes: --box-convention"),
])
def test_llava_unparseable_turn_is_one_line_naming_file_row_turn(llava, capsys, turns, convention, message):
    tmp_path, _ = llava
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "bad", "image": "coco/1.jpg", "conversations": turns}]))
    with pytest.raises(ValueError, match=message):
        convert_llava([str(path)], str(tmp_path / "out"), str(tmp_path / "images"), box_convention=convention)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    args = ["convert", "--from", "llava", str(tmp_path / "out"), "--inputs", str(path), "--images", str(tmp_path / "images")]
    assert main(args + (["--box-convention", convention] if convention else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


def test_llava_boxes_need_a_checkpoint(llava):
    tmp_path, path = llava
    with pytest.raises(ValueError, match="holds boxes: pass --checkpoint"):
        convert_llava([path], str(tmp_path / "out"), str(tmp_path / "images"), box_convention="normalized")


def test_sft_smoke_run_on_converted_llava_rows(tiny_checkpoints, llava, tmp_path):
    """The converted folder is SFT data as it is: trl's SFTTrainer trains the LLM on it, the ViT stays frozen."""
    tmp, path = llava
    checkpoint = tiny_checkpoints("tokens")
    out = str(tmp / "sft")
    convert_llava([path], out, str(tmp / "images"), box_convention="normalized", checkpoint=checkpoint)
    split = load_dataset(out, split="train")
    model, processor = GranViTForConditionalGeneration.from_pretrained(checkpoint), processor_of(checkpoint)
    items = sft_items(split, TaskBuilder(processor, tasks=("vqa",)))
    assert items is split  # conversation rows: used as they are
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GranViTSFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                            learning_rate=1e-3, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
                            disable_tqdm=True, seed=0)
    trainer = GranViTSFTTrainer(model=model, args=args, train_dataset=items,
                                data_collator=ConversationCollator(processor=processor), processing_class=processor)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    for name, param in model.named_parameters():
        if component_of(name) == "vision_tower":
            assert torch.equal(param, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if component_of(n) == "language_model")
