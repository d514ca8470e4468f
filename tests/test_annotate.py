"""The data engine (`granvit-data annotate`): real PP-OCR on rendered pages finds the known lines, the router sends
pages to OCR and scenes to the detector, every skip is counted exactly, the natural path runs end to end with a
detector and captioners built here (random weights), a rerun resumes, 2 processes write the rows of 1, and a SIGKILL
loses nothing."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from granvit.eval.metrics import ocr_detection_scores
from granvit.train.data.annotate import FileSource, annotate, open_source
from granvit.train.data.annotate_models import (
    SPACE_THRESHOLD,
    LabelCaptioner,
    RapidOCREngine,
    clean_caption,
    florence2_location,
    load_captioner,
    restore_spaces,
)
from granvit.train.data.annotate_regions import IMAGE_REASONS, AnnotateConfig, InputError
from granvit.train.data.annotate_review import lines_and_words, read_rows
from granvit.train.data.cli import main
from granvit.train.data.convert import FilterConfig
from granvit.train.data.synth import SynthConfig, generate_record, write_synth

PAGE = SynthConfig(image_size=512, ocr_fraction=1.0)
SCENE = SynthConfig(image_size=512, ocr_fraction=0.0)
needs_ocr = pytest.mark.skipif(  # the embedded OCR engine (no wheel for Python >= 3.13)
    importlib.util.find_spec("rapidocr_onnxruntime") is None, reason="rapidocr-onnxruntime not installed"
)
NO_BOX_RULES = FilterConfig(max_aspect=0, min_box_area=0)  # random detectors draw any box: keep the plumbing visible


def image_bytes(cfg, index, seed=7) -> bytes:
    return generate_record(cfg, seed, "test", index)["image"]["bytes"]


def rows_by_id(out, split="train") -> dict:
    return {r["image_id"]: r for r in read_rows(str(out), split, ["image_id", "kind", "width", "height", "regions"])}


def add_up(counts) -> int:
    """inputs accounted for: written + broken + skipped + image-level filters."""
    filtered = counts.get("filtered", {})
    return (counts.get("written", 0) + sum(counts.get("broken", {}).values()) + sum(counts.get("skipped", {}).values())
            + sum(filtered.get(r, 0) for r in IMAGE_REASONS))


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A random-weight DETR (tiny ResNet backbone from its config: no timm, no download) saved with its processor."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"])
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        num_queries=8, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )
    path = tmp_path_factory.mktemp("detr")
    DetrForObjectDetection(config).save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """2 OCR pages, 2 scenes, an exact copy of a page, a truncated JPEG and a small image."""
    folder = tmp_path_factory.mktemp("mixed")
    for name, data in [("page0.jpg", image_bytes(PAGE, 0)), ("page1.jpg", image_bytes(PAGE, 1)),
                       ("scene0.jpg", image_bytes(SCENE, 0)), ("scene1.jpg", image_bytes(SCENE, 1)),
                       ("sub/copy_of_page0.jpg", image_bytes(PAGE, 0)), ("truncated.jpg", image_bytes(SCENE, 2)[:3000])]:
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_bytes(data)
    Image.new("RGB", (400, 300), "white").save(folder / "small.png")
    return folder


# ----------------------------------------------------------------------------------------------- pure rules
def test_clean_caption_rules():
    assert clean_caption('  "A red car parked on the street."  ') == ("A red car parked on the street", None)
    assert clean_caption("a dog<|im_end|>") == ("a dog", None)
    assert clean_caption("</s><s></s>") == (None, "caption_empty")
    assert clean_caption("\x7f\x02mPmPmP") == (None, "caption_not_text")
    assert clean_caption("12 34 ## 56") == (None, "caption_not_text")
    assert clean_caption("a cat a cat a cat") == (None, "caption_repeated")
    assert clean_caption("blah mPmPmP") == (None, "caption_repeated")
    assert clean_caption("one two three four five six seven eight nine ten eleven") == (None, "caption_too_long")
    assert clean_caption("one two three four five six seven eight nine ten")[1] is None


def test_florence2_location_tokens():
    assert florence2_location([0, 0, 640, 480], (640, 480)) == "<loc_0><loc_0><loc_999><loc_999>"
    assert florence2_location([64, 48, 320, 240], (640, 480)) == "<loc_100><loc_100><loc_500><loc_500>"


def test_ocr_detection_scores_known_answer():
    refs = [[([0, 0, 10, 10], "open"), ([20, 0, 30, 10], "shop")], [([0, 0, 10, 10], "x")]]
    preds = [[([0, 0, 10, 9], "opem"), ([50, 50, 60, 60], "ghost")], []]
    s = ocr_detection_scores(preds, refs)
    assert (s["matched"], s["num_pred"], s["num_ref"]) == (1, 2, 3)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(1 / 3)
    assert s["exact"] == 0.0 and s["cer"] == 0.25  # "opem" vs "open": 1 edit in 4 characters


def test_lines_and_words_split():
    regions = [
        {"bbox": [0, 0, 40, 10], "caption": "to park", "kind": 1},
        {"bbox": [0, 0, 15, 10], "caption": "to", "kind": 1},
        {"bbox": [20, 0, 40, 10], "caption": "park", "kind": 1},
        {"bbox": [0, 20, 30, 30], "caption": "platform", "kind": 1},  # a one-word line
        {"bbox": [50, 50, 90, 90], "caption": "a dog", "kind": 0},  # natural: ignored
    ]
    lines, words = lines_and_words(regions)
    assert sorted(t for _, t in lines) == ["platform", "to park"]
    assert sorted(t for _, t in words) == ["park", "platform", "to"]


def test_box_rules_by_region_kind_shared_with_convert():
    """annotate's regions go through the box rules of filters.py, as convert's do: a 200 x 40 px word read by OCR is
    kept by default, a text rule drops it when set; the same box from a detector meets the paper's rules."""
    from granvit.train.data.annotate_models import TextLine
    from granvit.train.data.annotate_regions import Annotator

    image, box = Image.new("RGB", (640, 480)), [10.0, 10.0, 210.0, 50.0]

    def regions(cfg, **models):
        counts = {}
        ((_, found),) = Annotator(cfg, **models)(["a"], [image], counts)
        return found, counts.get("filtered", {})

    read = {"ocr": lambda im: [TextLine(box, "PHARMACY", 0.9, None)]}
    assert regions(AnnotateConfig(route="ocr"), **read) == ([{"bbox": box, "caption": "PHARMACY", "kind": "ocr"}], {})
    assert regions(AnnotateConfig(route="ocr", filters=FilterConfig(text_max_aspect=3)), **read) == ([], {"text_box_aspect": 1})
    detected = {"detector": lambda images: [[{"box": box, "score": 0.9, "label": "sign"}]], "captioner": LabelCaptioner()}
    assert regions(AnnotateConfig(route="natural", detector="x"), **detected)[1] == {"box_aspect": 1}


def ctc_frames(best: str, space_p: dict, characters: list[str]):
    """(1, frames, classes) probabilities: frame t's best class is best[t] ("_" = blank) with 0.9; the space class
    gets space_p.get(t, 0) taken from it."""
    import numpy as np

    preds = np.full((1, len(best), len(characters)), 0.01, dtype=np.float32)
    for t, c in enumerate(best):
        preds[0, t, characters.index(c) if c != "_" else 0] = 0.9
        preds[0, t, characters.index(" ")] = space_p.get(t, 0.0)
    return preds


def greedy(preds, characters) -> str:
    best = preds.argmax(2)[0]
    return "".join(characters[c] for t, c in enumerate(best) if c != 0 and (t == 0 or c != best[t - 1]))


def test_restore_spaces_rule():
    """A space goes between two characters when the space probabilities of the blank frames between them add up to
    the threshold (at the frame with the most); never inside a character's run, next to a space, or between two CJK
    ideographs; the other frames are untouched."""
    chars = ["blank", "a", "b", "中", "文", " "]
    t = SPACE_THRESHOLD
    preds = ctc_frames("aa__b__b_a", {2: t / 2, 3: t / 2 + 0.001, 5: t / 4, 6: t / 4}, chars)
    fixed = restore_spaces(preds, chars)
    assert greedy(preds, chars) == "abba" and greedy(fixed, chars) == "a bba"
    assert fixed.argmax(2)[0, 3] == chars.index(" ")  # the gap's likeliest space frame
    assert fixed[0, 3, chars.index(" ")] == pytest.approx(0.9)  # as sure as the blank it replaces
    changed = (fixed != preds).any(axis=2)[0]
    assert changed.tolist() == [t == 3 for t in range(10)]
    assert greedy(restore_spaces(ctc_frames("a_b", {1: 0.02}, chars), chars), chars) == "ab"  # below the threshold
    assert greedy(restore_spaces(ctc_frames("ab", {}, chars), chars), chars) == "ab"  # no frame between them
    assert greedy(restore_spaces(ctc_frames("中_文_a", {1: 0.5, 3: 0.5}, chars), chars), chars) == "中文 a"
    assert greedy(restore_spaces(ctc_frames("a_ _b", {1: 0.4, 3: 0.4}, chars), chars), chars) == "a b"  # one space
    assert restore_spaces(preds, chars, threshold=1e9) is preds  # nothing to insert: no copy


@needs_ocr
def test_embedded_ocr_restores_spaces(tmp_path):
    """Lines drawn here (not by the project's page generator) in four DejaVu faces read with their spaces: the
    recognizer alone drops most of them."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    lines = ["Sparse is better than dense", "although never is often", "special cases 8574 purity",
             "errors should never pass", "readability counts now"]
    fonts = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSans.ttf"]
    page = Image.new("RGB", (640, 480), (245, 240, 230))
    draw = ImageDraw.Draw(page)
    for k, (text, name) in enumerate(zip(lines, fonts)):
        font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), 22 + 2 * k)
        draw.text((20, 20 + 85 * k), text, font=font, fill=(20, 20, 40))
    read = [line.text for line in RapidOCREngine(threads=1)(page)]
    assert read == lines
    without = [line.text for line in RapidOCREngine(threads=1, space_threshold=0)(page)]
    assert sum(a == b for a, b in zip(without, lines)) < len(lines)
    words = [w for line in RapidOCREngine(threads=1)(page) for _, w in line.words]
    assert words == " ".join(lines).split()


# ----------------------------------------------------------------------------------------------- OCR path, CLI
@needs_ocr
def test_cli_ocr_pages_eval_preview_validate(tmp_path, capsys):
    """The embedded PP-OCR on rendered pages (text known): the lines are found, the output validates, the figures
    print, scenes without a detector are counted skips."""
    pages = tmp_path / "pages"
    write_synth(str(pages), {"train": 3}, SynthConfig(image_size=512, ocr_fraction=0.67), seed=3)
    kinds = [generate_record(SynthConfig(image_size=512, ocr_fraction=0.67), 3, "train", i)["kind"] for i in range(2)]
    assert kinds == ["ocr", "natural"]
    out, preview = tmp_path / "out", tmp_path / "preview.png"
    rc = main(["annotate", "--dataset", str(pages), str(out), "--eval-against", str(pages), "--preview", str(preview),
               "--limit", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "line: precision" in printed and "CER" in printed
    counts = json.loads((out / "counts-train.json").read_text())
    assert counts["routed"] == {"ocr": 1, "natural": 1}
    assert counts["skipped"] == {"no_detector": 1}  # a scene, and no --detector
    assert counts["written"] == 1 and add_up(counts) == counts["inputs"] == 2  # --limit 2 of 3
    scores = json.loads((out / "eval-train.json").read_text())
    assert scores["line"]["precision"] >= 0.8 and scores["line"]["recall"] >= 0.8  # lower means a box-mapping bug
    assert scores["images"] == 1 and scores["line"]["cer"] < 0.1 and scores["word"]["recall"] >= 0.6
    assert Image.open(preview).size[0] >= 400
    assert main(["validate", str(out)]) == 0
    from datasets import load_dataset

    assert len(load_dataset(str(out), split="train")) == counts["written"]


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["annotate", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["annotate", str(listing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(listing) in err and err.count("\n") == 1
    assert main(["annotate", "--dataset", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["annotate", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["annotate", str(tmp_path / "empty"), str(tmp_path / "out"), "--route", "natural"]) == 2
    assert "--route natural needs --detector" in capsys.readouterr().err
    Image.new("RGB", (640, 480), "red").save(tmp_path / "empty" / "red.png")
    assert main(["annotate", str(tmp_path / "empty"), str(tmp_path / "out"), "--route", "natural", "--detector", "no/such-model"]) == 2
    assert "--detector no/such-model: OSError" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()  # models load first: a typo does not start the folder


# ----------------------------------------------------------------------------------------------- natural path
@needs_ocr
def test_router_counts_and_natural_path_with_a_real_detector(mixed_folder, tiny_detector, tmp_path):
    """Pages -> OCR, scenes -> the DETR pipeline with label captions; the copy, the truncated file and the small
    image are counted once each, by reason."""
    cfg = AnnotateConfig(detector=tiny_detector, det_threshold=0.0, filters=NO_BOX_RULES)
    counts = annotate(FileSource(str(mixed_folder)), str(tmp_path / "out"), cfg, batch_size=4)
    assert counts["inputs"] == 7 and add_up(counts) == 7
    assert counts["broken"] == {"corrupt_image": 1}
    assert counts["filtered"]["duplicate_image"] == 1 and counts["filtered"]["image_short_side"] == 1
    assert counts["routed"] == {"ocr": 2, "natural": 2}
    rows = rows_by_id(tmp_path / "out")
    assert sorted(rows) == ["page0.jpg", "page1.jpg", "scene0.jpg", "scene1.jpg"]
    assert [rows[k]["kind"] for k in sorted(rows)] == [1, 1, 0, 0]
    for k in ("scene0.jpg", "scene1.jpg"):
        assert {r["caption"] for r in rows[k]["regions"]} <= {"cat", "dog"}
        assert 1 <= len(rows[k]["regions"]) <= cfg.max_regions
    page = generate_record(PAGE, 7, "test", 0)
    ref_lines, _ = lines_and_words(page["regions"])
    got_lines, _ = lines_and_words(rows["page0.jpg"]["regions"])
    assert ocr_detection_scores([got_lines], [ref_lines])["recall"] >= 0.8


@pytest.mark.parametrize("captioner", ["granvit", "pipeline"])
def test_natural_path_with_captioner_checkpoints(captioner, mixed_folder, tiny_detector, tiny_checkpoint, tmp_path):
    """A GranViT checkpoint through describe_regions, and the same folder through the generic image-text-to-text
    pipeline on crops: random weights answer garbage, which caption cleanup rejects and counts, box for box."""
    from granvit.train.data.annotate_models import CropCaptioner, Detector

    detector = Detector(tiny_detector, threshold=0.0)
    cfg = AnnotateConfig(route="natural", detector=tiny_detector, filters=NO_BOX_RULES)
    scenes = FileSource(str(mixed_folder / "sub"))  # 1 image (a page, but --route natural sends it to the detector)
    labelled = annotate(scenes, str(tmp_path / "label"), cfg, models={"detector": detector, "captioner": LabelCaptioner()})
    boxes = labelled["regions"]["natural"]
    model = (load_captioner(str(tiny_checkpoint), max_new_tokens=8) if captioner == "granvit"
             else CropCaptioner(str(tiny_checkpoint), max_new_tokens=8))
    counts = annotate(scenes, str(tmp_path / "out"), cfg, models={"detector": detector, "captioner": model})
    rejected = sum(v for k, v in counts.get("filtered", {}).items() if k.startswith("caption_"))
    assert rejected + counts.get("regions", {}).get("natural", 0) == boxes  # every box: a caption or a counted reason
    assert add_up(counts) == counts["inputs"] == 1


class FakeDetector:
    """One box per image, an empty answer for black images, an exception for white ones."""

    def __call__(self, images):
        out = []
        for image in images:
            colour = image.getpixel((0, 0))
            if colour == (255, 255, 255):
                raise RuntimeError("detector exploded")
            out.append([] if colour == (0, 0, 0) else [{"box": [0, 0, 200, 150], "score": 0.9, "label": "block"}])
        return out


class FakeCaptioner:
    def __call__(self, requests):
        if any(image.getpixel((0, 0)) == (0, 0, 255) for image, _, _ in requests):
            raise RuntimeError("captioner exploded")
        return [["a coloured block"] * len(boxes) for _, boxes, _ in requests]


def colour_folder(folder, colours):
    folder.mkdir()
    for i, colour in enumerate(colours):
        Image.new("RGB", (640, 480), colour).save(folder / f"{i:02d}.png")
    return str(folder)


def test_model_errors_and_empty_detections_are_counted_skips(tmp_path):
    colours = ["red", "white", "green", "black", "blue", "yellow"]
    folder = colour_folder(tmp_path / "in", colours)
    cfg = AnnotateConfig(route="natural", detector="fake")
    counts = annotate(FileSource(folder), str(tmp_path / "out"), cfg, batch_size=3,
                      models={"detector": FakeDetector(), "captioner": FakeCaptioner()})
    assert counts["skipped"] == {"detector_error": 1, "no_detections": 1, "captioner_error": 1}
    assert counts["written"] == 3 and add_up(counts) == counts["inputs"] == 6
    assert sorted(rows_by_id(tmp_path / "out")) == ["00.png", "02.png", "05.png"]


def build_tiny_florence2(path) -> str:
    """A random-weight Florence-2 (transformers-native) with a BPE tokenizer trained here: location tokens included."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig, PreTrainedTokenizerFast)

    from granvit.train.tiny import train_tokenizer

    torch.manual_seed(0)
    bpe = train_tokenizer(["what does the region describe", "a red car on the left"], vocab_size=300)._tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[1, 2], num_groups=[1, 2],
                                   window_size=2, projection_dim=32, max_position_embeddings=8)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id))
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # (32 / 4 / 2)^2 patches + the pooled token
    model.save_pretrained(path)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def test_florence2_captioner_through_the_pipeline(tmp_path):
    from granvit.train.data.annotate_models import Florence2Captioner

    captioner = load_captioner(build_tiny_florence2(tmp_path / "florence2"), max_new_tokens=6)
    assert isinstance(captioner, Florence2Captioner)
    folder = colour_folder(tmp_path / "in", ["red", "green", "yellow"])
    counts = annotate(FileSource(folder), str(tmp_path / "out"), AnnotateConfig(route="natural", detector="fake"),
                      models={"detector": FakeDetector(), "captioner": captioner})
    rejected = sum(v for k, v in counts.get("filtered", {}).items() if k.startswith("caption_"))
    assert rejected + counts.get("regions", {}).get("natural", 0) == 3  # one box per image
    assert add_up(counts) == counts["inputs"] == 3


def build_tiny_ppocrv5(path) -> tuple[str, str]:
    """Random-weight PP-OCRv5 server det + rec (transformers-native) with tiny HGNetV2 backbones. The detector's last
    convolution is set to say "text" everywhere, so it finds exactly one text region, the whole image, and the
    recognizer's last layer to say "a" at every step, which CTC decoding reads as "a"."""
    import string

    from transformers import (PPOCRV5ServerDetConfig, PPOCRV5ServerDetForObjectDetection, PPOCRV5ServerDetImageProcessor,
                              PPOCRV5ServerRecConfig, PPOCRV5ServerRecForTextRecognition, PPOCRV5ServerRecImageProcessor)

    torch.manual_seed(0)
    kernels = {"longratio": 3, "midratio": 3, "shortratio": 3}
    intraclass = {"reduce_channel": [1, 1, 0], "return_channel": [1, 1, 0]}
    for ratio, k in kernels.items():
        intraclass[f"vertical_long_to_small_conv_{ratio}"] = [[k, 1], [1, 1], [k // 2, 0]]
        intraclass[f"horizontal_small_to_long_conv_{ratio}"] = [[1, k], [1, 1], [0, k // 2]]
        intraclass[f"symmetric_conv_long_{ratio}"] = [[k, k], [1, 1], [k // 2, k // 2]]
    stages = {"out_features": ["stage1", "stage2", "stage3", "stage4"], "stage_num_blocks": [1, 1, 1, 1]}
    det = PPOCRV5ServerDetForObjectDetection(PPOCRV5ServerDetConfig(
        backbone_config={"model_type": "hgnet_v2", **stages, "out_indices": [1, 2, 3, 4], "depths": [1, 1, 1, 1],
                         "hidden_sizes": [16, 32, 64, 128], "stage_in_channels": [16, 16, 32, 64],
                         "stage_mid_channels": [16, 16, 32, 64], "stage_out_channels": [16, 32, 64, 128],
                         "stage_downsample": [False, True, True, True], "stage_light_block": [False, False, True, True],
                         "stage_kernel_size": [3, 3, 3, 3], "stage_numb_of_layers": [1, 1, 1, 1],
                         "stem_channels": [3, 8, 16], "embedding_size": 16},
        neck_out_channels=32, intraclass_block_number=4, intraclass_block_config=intraclass,
        scale_factor_list=[1, 2, 4, 8], kernel_list=[3, 2, 2]))
    with torch.no_grad():
        final = det.head.local_refinement_module.convolution_final
        final.weight.zero_()
        final.bias.fill_(10.0)  # sigmoid(10): every pixel is text
    characters = ["blank", *string.ascii_lowercase, *string.digits, " "]
    rec = PPOCRV5ServerRecForTextRecognition(PPOCRV5ServerRecConfig(
        backbone_config={"model_type": "hgnet_v2", "arch": "L", **stages, "hidden_sizes": [8, 8, 8, 8],
                         "stem_channels": [3, 8, 8], "stage_in_channels": [8, 8, 8, 8], "stage_mid_channels": [8, 8, 8, 8],
                         "stage_out_channels": [8, 8, 8, 8], "stage_downsample": [True, True, True, True],
                         "stem_strides": [2, 1, 1, 1, 1], "stage_downsample_strides": [[2, 1], [1, 2], [2, 1], [2, 1]]},
        hidden_size=8, depth=1, head_out_channels=len(characters), num_attention_heads=2))
    with torch.no_grad():
        rec.head.head.weight.zero_()
        rec.head.head.bias.copy_(10.0 * (torch.arange(len(characters)) == characters.index("a")))
    det.save_pretrained(path / "det")
    PPOCRV5ServerDetImageProcessor().save_pretrained(path / "det")
    rec.save_pretrained(path / "rec")
    PPOCRV5ServerRecImageProcessor(character_list=characters).save_pretrained(path / "rec")
    return str(path / "det"), str(path / "rec")


def test_transformers_ppocr_engine_maps_boxes_to_the_original_image(tmp_path):
    """The GPU option's plumbing on CPU: a detector that calls the whole 650 x 470 image text gives one line whose
    box is the whole image in original pixels (the processor resizes to a multiple of 32 and back)."""
    from granvit.train.data.annotate_models import TransformersOCREngine

    det, rec = build_tiny_ppocrv5(tmp_path)
    engine = TransformersOCREngine(det, rec, text_score=0.0)
    (line,) = engine(Image.new("RGB", (650, 470), "white"))
    assert line.box == [0.0, 0.0, 650.0, 470.0] and line.text == "a" and line.words is None
    assert line.score > 0.99


def test_rerun_resumes_the_missing_shards_only(tmp_path):
    folder = colour_folder(tmp_path / "in", ["red", "green", "orange", "purple", "yellow", "pink"])
    models = {"detector": FakeDetector(), "captioner": FakeCaptioner()}
    cfg = AnnotateConfig(route="natural", detector="fake")
    out = tmp_path / "out"
    first = annotate(FileSource(folder), str(out), cfg, shard_images=2, models=models)
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if killed before this shard was finished (its temp file would be left behind)
    (out / "data" / f".{shards[1].name}.tmp-99999").write_bytes(b"partial")
    again = annotate(FileSource(folder), str(out), cfg, shard_images=2, models=models)
    assert again == first
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "data").glob("*.parquet"))}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    assert not list((out / "data").glob(".*tmp*"))
    with pytest.raises(InputError, match=r"other settings \(detector 'fake' -> 'other'\)"):
        annotate(FileSource(folder), str(out), AnnotateConfig(route="natural", detector="other"), shard_images=2, models=models)


def test_list_file_and_glob_inputs(tmp_path):
    folder = colour_folder(tmp_path / "in", ["red", "green"])
    (tmp_path / "list.txt").write_text("in/01.png\nin/00.png\nin/gone.png\n")
    source = open_source(str(tmp_path / "list.txt"))
    assert source.ids == ["in/01.png", "in/00.png", "in/gone.png"]
    counts = annotate(source, str(tmp_path / "out"), AnnotateConfig(route="natural", detector="fake"),
                      models={"detector": FakeDetector(), "captioner": FakeCaptioner()})
    assert counts["broken"] == {"missing_image": 1} and counts["written"] == 2
    assert len(open_source(os.path.join(folder, "*.png"))) == 2


# ----------------------------------------------------------------------------------------------- scale (slow)
def run_cli(args, timeout=600, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    return subprocess.run([*prefix, "-m", "granvit.train.data.cli", "annotate", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def all_rows(out) -> list:
    rows = read_rows(str(out), "train", ["image_id", "kind", "width", "height", "regions", "image"])
    return sorted((json.dumps({**r, "image": r["image"]["bytes"].hex()}, sort_keys=True) for r in rows))


@needs_ocr
@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(mixed_folder, tiny_detector, tmp_path):
    args = [str(mixed_folder), "--detector", tiny_detector, "--det-threshold", "0", "--max-aspect", "0",
            "--min-box-area", "0", "--shard-images", "2"]
    one = run_cli([args[0], str(tmp_path / "one"), *args[1:]])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([args[0], str(tmp_path / "two"), *args[1:]], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2" in two.stderr  # really two ranks (two lone processes would each write every shard)
    assert all_rows(tmp_path / "two") == all_rows(tmp_path / "one") != []
    counts = [json.loads((tmp_path / d / "counts-train.json").read_text()) for d in ("one", "two")]
    assert counts[0] == counts[1]
    assert not list((tmp_path / "two").glob("manifest.rank-*"))  # merged into manifest.json
    assert main(["validate", str(tmp_path / "two")]) == 0


@needs_ocr
@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_rows(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(6):
        (pages / f"{i}.jpg").write_bytes(image_bytes(PAGE, i))
    args = ["--route", "ocr", "--shard-images", "1"]
    full = run_cli([str(pages), str(tmp_path / "full"), *args])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "granvit.train.data.cli", "annotate", str(pages), str(out), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "data").glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list((out / "data").glob("*.parquet"))) < 6
    again = run_cli([str(pages), str(out), *args])
    assert again.returncode == 0, again.stderr[-3000:]
    assert all_rows(out) == all_rows(tmp_path / "full")
    assert json.loads((out / "counts-train.json").read_text()) == json.loads((tmp_path / "full" / "counts-train.json").read_text())
