"""Processor behaviour: box codec, prompt safety, image handling, bad input."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from granvit import GranViTImageProcessor
from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


# ---- box codec ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "box,size",
    [
        ([0, 0, 640, 480], (640, 480)),  # the whole image: corners
        ([0, 0, 1, 1], (640, 480)),  # tiny box at the origin
        ([639, 479, 640, 480], (640, 480)),  # tiny box at the far corner
        ([0, 200, 640, 201], (640, 480)),  # full-width sliver on an edge
        ([12.3, 45.6, 78.9, 101.2], (100, 200)),
        ([0.5, 0.5, 1, 1], (1, 1)),  # a 1x1 image
        ([5000, 0, 10000, 10], (10000, 10)),  # extreme aspect ratio
    ],
)
def test_box_round_trip_within_one_bin(processor, box, size):
    text = processor.encode_box(box, size)
    bins = processor.box_to_bins(box, size)
    if processor.box_format == "tokens":
        assert text == "<box>" + "".join(f"<coord_{b}>" for b in bins) + "</box>"
        assert len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) == 6
    else:  # the paper's format: the bins as text
        assert text == f"[{bins[0]}, {bins[1]}, {bins[2]}, {bins[3]}]"
        assert processor.tokenizer.decode(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    (decoded,) = processor.decode_boxes(text, size)
    n = processor.num_coord_bins
    for original, back, extent in zip(box, decoded, (size[0], size[1]) * 2):
        assert abs(original - back) <= extent / n + 1e-6


def test_box_survives_generation_decoding(processor):
    """Coordinate tokens are not special: skip_special_tokens=True (what pipelines use) keeps them."""
    ids = processor.tokenizer(processor.encode_box([10, 20, 30, 40], (100, 100)), add_special_tokens=False)["input_ids"]
    text = processor.batch_decode([ids], skip_special_tokens=True)[0]
    assert processor.post_process_grounding([text], [(100, 100)])[0] == processor.decode_boxes(text, (100, 100))
    assert len(processor.post_process_grounding(torch.tensor([ids]), [(100, 100)])[0]) == 1


@pytest.mark.parametrize(
    "garbage",
    ["", "no box here", "<box><coord_1><coord_2></box>", "<box><coord_5><coord_5><coord_1><coord_9></box>",
     "<box><coord_1><coord_2><coord_3><coord_999999></box>", "<box>" * 50, None, 42,
     "[1, 2]", "[5, 5, 1, 9]", "[1, 2, 3, 999999]", "[1, 2, 3, 4" , "[" * 50, "[-1, 2, 3, 4]"],
)
def test_malformed_output_gives_no_box(processor, garbage):
    assert processor.decode_boxes(garbage, (100, 100)) == []


def test_each_format_decodes_only_its_own_boxes(processor):
    """A box in the other format is text like any other: the decoder reads only the checkpoint's own format."""
    tokens, text = "<box><coord_1><coord_2><coord_3><coord_4></box>", "[1, 2, 3, 4]"
    own, other = (text, tokens) if processor.box_format == "text" else (tokens, text)
    assert processor.decode_boxes(own, (100, 100)) == [pytest.approx([1.5, 2.5, 3.5, 4.5])]  # bin centres, 1 px bins
    assert processor.decode_boxes(other, (100, 100)) == []
    two = processor.encode_boxes([[10, 10, 20, 20], [30, 30, 40, 40]], (100, 100))
    assert processor.decode_boxes(two, (100, 100)) == [pytest.approx([10.5, 10.5, 20.5, 20.5]), pytest.approx([30.5, 30.5, 40.5, 40.5])]


@pytest.mark.parametrize(
    "box,rule",
    [
        ([float("nan"), 0, 10, 10], "finite"),
        ([0, 0, float("inf"), 10], "finite"),
        ([-1, 0, 10, 10], "non-negative"),
        ([0, 0, 101, 10], "inside image"),
        ([0, 0, 10, 60], "inside image"),
        ([20, 0, 10, 10], "x1 <= x2"),
        ([0, 20, 10, 10], "x1 <= x2"),
        ([5, 5, 5, 10], "positive area"),
        ([1, 2, 3], "length"),
        (["a", 0, 1, 1], "numeric"),
    ],
)
def test_bad_boxes_raise_naming_box_and_rule(processor, box, rule):
    with pytest.raises(ValueError) as err:
        processor.encode_box(box, (100, 50))
    assert rule in str(err.value) and "Box" in str(err.value)


# ---- prompts and injection -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", ["<image>", "<box>", "</box>", "<coord_17>", "<|assistant|>", "<|endoftext|>"])
def test_user_text_cannot_inject_control_tokens(processor, hostile):
    image = Image.new("RGB", (32, 32))
    tok = processor.tokenizer
    control_ids = {tok.convert_tokens_to_ids(t) for t in processor.control_tokens()} | {tok.eos_token_id}
    for prompt in (processor.caption2bbox_prompt(f"a {hostile} cat"), processor.vqa_prompt(f"why {hostile}?")):
        plain = processor(images=[image], text=[prompt])["input_ids"][0].tolist()
        reference = processor(images=[image], text=[prompt.replace(hostile, "")])["input_ids"][0].tolist()
        count = lambda ids: sum(i in control_ids for i in ids)  # noqa: E731
        assert count(plain) == count(reference)
        assert hostile in tok.decode(plain)


def test_chat_template_and_prompt_builders_agree(processor):
    image = Image.new("RGB", (32, 32))
    prompt = processor.caption2bbox_prompt("red <box> square")
    direct = processor(images=[image], text=[prompt])["input_ids"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    via_chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert torch.equal(processor(images=[image], text=[via_chat])["input_ids"], direct)
    # Raw user text in a chat message (no builder) is also treated as plain text.
    raw = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a <coord_3> b"}]}]
    ids = processor.apply_chat_template(raw, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        images=[image])["input_ids"][0].tolist()
    if "<coord_3>" in processor.tokenizer.get_vocab():
        assert processor.tokenizer.convert_tokens_to_ids("<coord_3>") not in ids
    assert "a <coord_3> b" in processor.tokenizer.decode(ids)


def test_bbox2caption_prompt_carries_the_box(processor):
    prompt = processor.bbox2caption_prompt([10, 10, 50, 50], (100, 100))
    ids = processor(images=[Image.new("RGB", (100, 100))], text=[prompt])["input_ids"][0].tolist()
    if processor.box_format == "tokens":  # real box tokens, not their spelling as plain text
        assert ids.count(processor.box_start_token_id) == 1 and ids.count(processor.box_end_token_id) == 1
    assert processor.decode_boxes(processor.tokenizer.decode(ids), (100, 100)) == [[10.5, 10.5, 50.5, 50.5]]
    assert ids.count(processor.image_token_id) == processor.num_image_tokens


def test_placeholder_count_must_match_images(processor):
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=[Image.new("RGB", (8, 8))], text=["<|user|><image><image>hi<|endoftext|><|assistant|>"])


# ---- images ------------------------------------------------------------------------------------------------------
def _exif_rotated_jpeg() -> Image.Image:
    """A 40x20 JPEG (red right half) whose EXIF says 'rotate 90 CW': upright it is 20x40 with red at the bottom."""
    image = Image.new("RGB", (40, 20), "blue")
    image.paste(Image.new("RGB", (20, 20), "red"), (20, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (1, 1), "red"),
        lambda: Image.new("RGB", (10000, 10), "red"),
        lambda: Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)),  # 16-bit white
        lambda: Image.new("P", (20, 20), 3),
        lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)),  # red in CMYK
        lambda: Image.new("LA", (20, 20), (128, 0)),  # fully transparent -> white
        lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 255)),
        lambda: Image.new("1", (20, 20), 1),
        lambda: Image.new("F", (20, 20), 0.5),
        _exif_rotated_jpeg,
    ],
)
def test_any_image_mode_becomes_a_square_rgb_tensor(make):
    processor = GranViTImageProcessor(image_size=64)
    out = processor([make()])
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.isfinite(out["pixel_values"]).all()


def test_colours_and_exif_are_respected():
    processor = GranViTImageProcessor(image_size=40, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    white16 = processor([Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))])["pixel_values"][0]
    assert torch.allclose(white16, torch.ones_like(white16), atol=1e-3)
    cmyk = processor([Image.new("CMYK", (20, 20), (0, 255, 255, 0))])["pixel_values"][0]
    assert cmyk[0].mean() > 0.9 and cmyk[1].mean() < 0.1
    transparent = processor([Image.new("LA", (20, 20), (0, 0))])["pixel_values"][0]
    assert transparent.min() > 0.99
    rotated = processor([_exif_rotated_jpeg()])
    assert rotated["image_sizes"] == [(20, 40)]  # upright size
    top, bottom = rotated["pixel_values"][0][:, 2:18, 2:18], rotated["pixel_values"][0][:, 22:38, 2:18]
    assert top[2].mean() > 0.8 and bottom[0].mean() > 0.8 and bottom[2].mean() < 0.2


def test_aspect_ratio_padding_and_box_mapping():
    processor = GranViTImageProcessor(image_size=64)
    image = Image.new("RGB", (200, 100), "red")
    pixels = processor([image])["pixel_values"][0]
    assert torch.allclose(pixels[:, 40:, :], torch.zeros(3, 24, 64))  # padding normalizes to 0
    model_box = processor.to_model_space([[0, 0, 200, 100]], (200, 100))
    torch.testing.assert_close(model_box, torch.tensor([[0.0, 0.0, 1.0, 0.5]]))
    torch.testing.assert_close(processor.from_model_space(model_box, (200, 100)), torch.tensor([[0.0, 0, 200, 100]]))


def test_pixel_limit_is_a_clear_error_before_decoding(tmp_path):
    # A decompression-bomb sized PNG: 20000 x 20000 1-bit pixels compress to a few kB.
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    processor = GranViTImageProcessor(image_size=32)
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor([str(path)])
    with pytest.raises(ValueError, match="max_image_pixels"):
        GranViTImageProcessor(image_size=32, max_image_pixels=100)([Image.new("RGB", (11, 10))])


def test_image_tokens_expand_to_model_count(processor):
    batch = processor(images=[Image.new("RGB", (9, 9))], text=["hi"])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens
    assert math.isqrt(processor.num_image_tokens) ** 2 == processor.num_image_tokens


# ---- HF processor kwargs -----------------------------------------------------------------------------------------
def _two_prompts(processor):
    return [processor.vqa_prompt("hi"), processor.vqa_prompt("a much longer question about the whole picture")]


def test_padding_and_return_tensors_work_as_in_hf_processors(processor):
    images, prompts = [Image.new("RGB", (8, 8))] * 2, _two_prompts(processor)
    unpadded = processor.prompt_ids(prompts)
    short, long = (len(ids) for ids in unpadded)
    ragged = processor(images=images, text=prompts, padding=False, return_tensors=None)
    assert ragged["input_ids"] == unpadded and ragged["attention_mask"] == [[1] * short, [1] * long]
    with pytest.raises(ValueError, match="without padding"):
        processor(images=images, text=prompts, padding=False)  # tensors (the default) need equal lengths
    default = processor(images=images, text=prompts)  # GranViT's default: padded to the longest, tensors, left side
    assert isinstance(default["input_ids"], torch.Tensor) and default["input_ids"].shape == (2, long)
    assert default["attention_mask"][0].tolist() == [0] * (long - short) + [1] * short
    fixed = processor(images=images, text=prompts, padding="max_length", max_length=long + 3, padding_side="right")
    assert fixed["input_ids"].shape == (2, long + 3) and fixed["attention_mask"][1].tolist() == [1] * long + [0] * 3
    nested = processor(images=images, text=prompts, text_kwargs={"padding": "max_length", "max_length": long + 3,
                                                                    "padding_side": "right"})
    assert torch.equal(nested["input_ids"], fixed["input_ids"])
    assert processor(images=images, text=prompts, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0
    as_numpy = processor(images=images, text=prompts, return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["input_ids"].tolist() == default["input_ids"].tolist()
    assert "attention_mask" not in processor(images=images, text=prompts, return_attention_mask=False)


def test_truncation_keeps_labels_aligned_and_never_cuts_the_image(processor):
    image, prompt = Image.new("RGB", (8, 8)), processor.vqa_prompt("what colour is it")
    full = processor(images=[image], text=[prompt], targets=[processor.plain_text("a red square")])
    n = full["input_ids"].shape[1]
    cut = processor(images=[image], text=[prompt], targets=[processor.plain_text("a red square")], truncation=True,
                    max_length=n - 2)
    assert torch.equal(cut["input_ids"], full["input_ids"][:, : n - 2])
    assert torch.equal(cut["labels"], full["labels"][:, : n - 2])
    with pytest.raises(ValueError, match="cuts into the image tokens"):
        processor(images=[image], text=[prompt], truncation=True, max_length=processor.num_image_tokens)
    with pytest.raises(ValueError, match="more than max_length"):
        too_short = len(processor.prompt_ids([prompt])[0]) - 1
        processor(images=[image], text=[prompt], padding="max_length", max_length=too_short)


@pytest.mark.parametrize("kwargs", [{"stride": 2}, {"foo": 1}, {"images_kwargs": {"size": {"height": 9, "width": 9}}},
                                    {"text_kwargs": {"return_offsets_mapping": True}}, {"return_mm_token_type_ids": True}])
def test_unknown_kwargs_raise(processor, kwargs):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        processor(images=[Image.new("RGB", (8, 8))], text=["hi"], **kwargs)


def test_targets_pad_right_and_generation_pads_left_by_default(processor):
    images, prompts = [Image.new("RGB", (8, 8))] * 2, _two_prompts(processor)
    train = processor(images=images, text=prompts, targets=[processor.plain_text("a"), processor.plain_text("b")])
    assert train["attention_mask"][0, 0] == 1 and train["attention_mask"][0, -1] == 0
    assert train["labels"][0, -1] == -100
    assert processor(images=images, text=prompts)["attention_mask"][0, 0] == 0
