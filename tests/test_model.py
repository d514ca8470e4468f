"""Model behaviour on a tiny GranViT: loss, generation with/without cache, batching, region features, save/load."""

import copy
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.ops import roi_align

from granvit import GranViTConfig, GranViTForConditionalGeneration
from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format


def _scene(color="red", size=(80, 48)):
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (20, 20), color), (10, 10))
    return image


def test_config_round_trip(tmp_path, tiny_checkpoint):
    config = GranViTConfig.from_pretrained(tiny_checkpoint)
    config.save_pretrained(tmp_path)
    again = GranViTConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert type(again.vision_config).__name__ == "SiglipVisionConfig" and not again.vision_config.vision_use_head
    assert again.text_config.model_type == "qwen2"
    assert again.num_image_tokens == (64 // 16) ** 2


def test_config_defaults_and_merge():
    config = GranViTConfig()
    assert config.vision_config.model_type == "siglip_vision_model" and config.vision_config.image_size == 512
    assert config.num_coord_bins == 1000 and config.num_image_tokens == 1024
    assert GranViTConfig(spatial_merge_size=2).num_image_tokens == 256
    with pytest.raises(ValueError, match="must divide the patch grid"):
        GranViTConfig(spatial_merge_size=3)


def test_forward_loss_only_with_labels(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = processor(images=[_scene()], text=[processor.vqa_prompt("what is it?")], targets=["a red square"])
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    batch.pop("labels")
    assert model(**batch).loss is None


def test_loss_ignores_prompt_positions(tiny_model_and_processor):
    """Labels are -100 on the prompt: changing the prompt's labels cannot matter, changing the answer does."""
    model, processor = tiny_model_and_processor
    box = processor.encode_box([10, 10, 30, 30], (80, 48))
    batch = processor(images=[_scene()], text=["where?"], targets=[box])
    n_answer = int((batch["labels"] != -100).sum())
    # tokens: <box> + 4 coordinates + </box>; text: "[12, 20, 37, 62]", one token per digit, bracket, comma, space; + eos
    assert n_answer == {"tokens": 6, "text": 16}[processor.box_format] + 1
    assert (batch["labels"][0, -n_answer:] == batch["input_ids"][0, -n_answer:]).all()


def test_greedy_generate_cache_equals_no_cache(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = processor(images=[_scene()], text=[processor.caption2bbox_prompt("red square")])
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with_cache = model.generate(**batch, use_cache=True, **kwargs)
    without_cache = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


def test_batched_left_padded_generate_equals_one_by_one(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    images = [_scene("red"), _scene("blue", (40, 90))]
    prompts = [processor.vqa_prompt("what colour?"), processor.vqa_prompt("is there a much longer question here?")]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batch = processor(images=images, text=prompts)
    assert batch["attention_mask"][0, 0] == 0  # shorter prompt is left-padded
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for i in range(2):
        single = processor(images=[images[i]], text=[prompts[i]])
        alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[i], alone[0])


def test_image_token_mismatch_is_a_clear_error(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = processor(images=[_scene()], text=["hi"])
    batch["input_ids"][0, batch["input_ids"][0] == model.config.image_token_id] = processor.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**batch)


def test_region_features_match_hand_computed_roi_align(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    pixel_values = processor.image_processor([_scene()])["pixel_values"]
    with torch.no_grad():
        patches = model.model.get_patch_features(pixel_values)  # (1, 4, 4, d)
        grid = patches.shape[1]
        # One patch cell -> exactly that patch's feature; a 2x2 block pooled to 1x1 -> the mean of its 4 patches.
        one_cell = torch.tensor([[1 / grid, 2 / grid, 2 / grid, 3 / grid]])
        block = torch.tensor([[0.0, 0.0, 2 / grid, 2 / grid]])
        feats = model.get_region_features(pixel_values, [torch.cat([one_cell, block])], output_size=1)
    assert feats.shape == (2, patches.shape[-1], 1, 1)
    torch.testing.assert_close(feats[0, :, 0, 0], patches[0, 2, 1])
    torch.testing.assert_close(feats[1, :, 0, 0], patches[0, :2, :2].reshape(-1, patches.shape[-1]).mean(0))
    # The (K, 5) form with batch indices gives the same numbers, and a larger output matches torchvision directly.
    with torch.no_grad():
        rois = torch.tensor([[0, 0.1, 0.2, 0.7, 0.9]])
        via_api = model.get_region_features(pixel_values, rois, output_size=3)
        fmap = patches.permute(0, 3, 1, 2)
        expected = roi_align(fmap, torch.tensor([[0, 0.4, 0.8, 2.8, 3.6]]), 3, aligned=True)
    torch.testing.assert_close(via_api, expected)


def test_safetensors_keys_equal_state_dict(tiny_checkpoint):
    model = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert saved == expected


def test_save_load_identity_in_process(tmp_path, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    model.save_pretrained(tmp_path)
    again = GranViTForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = processor(images=[_scene()], text=["hello"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits, rtol=0, atol=0)


def test_coordinate_embeddings_are_smooth(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    if model.config.box_format != "tokens":
        pytest.skip("the text format adds no coordinate tokens")
    start, n = model.config.coord_token_start_id, model.config.num_coord_bins
    emb = torch.nn.functional.normalize(model.get_input_embeddings().weight[start : start + n], dim=-1)
    neighbour = (emb[:-1] * emb[1:]).sum(-1).mean()
    far = (emb[: n // 2] * emb[n // 2 :]).sum(-1).mean()
    assert neighbour > 0.9 and neighbour > far + 0.3


def test_region_features_in_bf16_on_cpu(tiny_model_and_processor):
    """torchvision's CPU roi_align has no bf16 kernel: the model computes it in fp32 and returns bf16."""
    model, processor = tiny_model_and_processor
    pixel_values = processor.image_processor([_scene()])["pixel_values"]
    box = [torch.tensor([[0.1, 0.1, 0.6, 0.7]])]
    with torch.no_grad():
        reference = model.get_region_features(pixel_values, box, output_size=2)
        half = copy.deepcopy(model).to(torch.bfloat16).get_region_features(pixel_values, box, output_size=2)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, rtol=0.1, atol=0.1)


def test_inference_dtype_follows_the_hardware(monkeypatch, tmp_path):
    """One rule for the Space and granvit-eval: bf16 off-CPU and on CPUs with bf16 matrix units, else fp32."""
    import builtins

    assert GranViTForConditionalGeneration.inference_dtype("cuda:0") is torch.bfloat16
    real_open = builtins.open
    for flags, expected in (("fpu sse avx512_bf16 amx_tile", torch.bfloat16), ("fpu sse avx2", torch.float32)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"flags\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
        assert GranViTForConditionalGeneration.inference_dtype("cpu") is expected
