"""High-resolution tiling (tiling_granvit.py): grids, token counts, stitched region features, boxes, remote-code load.

Tiny tiled checkpoints: 64 px views, 16 px patches (a 4 x 4 patch grid, 16 image tokens per view), up to 4 tiles.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BOX_FORMATS
from granvit import GranViTForConditionalGeneration, GranViTProcessor
from granvit.tiling_granvit import num_views, select_tile_grid, view_markers
from PIL import Image
from torchvision.ops import roi_align

MAX_TILES = 4
# (width, height) -> the (rows, cols) grid InternVL's rule picks for 64 px tiles and at most 4 tiles
SIZES = {(200, 90): (1, 2), (100, 400): (4, 1), (300, 200): (2, 2), (40, 40): (1, 1), (200, 200): (2, 2), (150, 60): (1, 3)}


@pytest.fixture(scope="module")
def tiled_checkpoints(tmp_path_factory):
    from granvit.train.tiny import build_tiny_checkpoint

    built = {}

    def get(box_format: str = "tokens"):
        if box_format not in built:
            built[box_format] = build_tiny_checkpoint(
                tmp_path_factory.mktemp(f"tiled-{box_format}"), box_format=box_format, max_tiles=MAX_TILES
            )
        return built[box_format]

    return get


@pytest.fixture(scope="module")
def tiled(tiled_checkpoints):
    checkpoint = tiled_checkpoints("tokens")
    return GranViTForConditionalGeneration.from_pretrained(checkpoint).eval(), GranViTProcessor.from_pretrained(checkpoint)


def _picture(size):
    """Distinct content per region, so a misplaced tile changes the features."""
    width, height = size
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (max(1, width // 3), max(1, height // 2)), "red"), (width // 5, height // 4))
    image.paste(Image.new("RGB", (max(1, width // 4), max(1, height // 3)), "blue"), (width // 2, height // 2))
    return image


def test_grid_rule_known_answers():
    # 1024 x 768 at 512 px tiles, 6 tiles: 3:2 is the closest ratio to 4:3 -> 2 rows x 3 columns (+ the thumbnail)
    assert select_tile_grid((1024, 768), 6, 512) == (2, 3)
    for size, grid in SIZES.items():
        assert select_tile_grid(size, MAX_TILES, 64) == grid, size
    # a tie between 1 x 1 and 2 x 2 (both square) goes to the larger grid only for an image with enough pixels
    assert select_tile_grid((64, 64), 4, 64) == (1, 1) and select_tile_grid((200, 200), 4, 64) == (2, 2)
    assert num_views((1, 1)) == 1 and num_views((2, 3)) == 7
    assert view_markers((1, 2)) == ["global:", "tile 1,1:", "tile 1,2:"]


def test_off_by_default_and_recorded(tiled_checkpoints, tiny_checkpoint):
    from granvit import GranViTConfig

    assert GranViTConfig().max_tiles == 0
    assert json.loads((tiny_checkpoint / "config.json").read_text()).get("max_tiles", 0) == 0
    checkpoint = tiled_checkpoints("tokens")
    assert json.loads((checkpoint / "config.json").read_text())["max_tiles"] == MAX_TILES
    assert GranViTProcessor.from_pretrained(checkpoint).image_processor.max_tiles == MAX_TILES
    assert (checkpoint / "tiling_granvit.py").is_file()  # the Hub file travels with the checkpoint


def test_token_counts_match_features(tiled):
    model, processor = tiled
    images = [_picture(size) for size in SIZES]
    batch = processor(images=images, text=[processor.vqa_prompt("what?")] * len(images))
    assert batch["image_grids"].tolist() == [list(g) for g in SIZES.values()]
    views = [num_views(g) for g in SIZES.values()]
    assert batch["pixel_values"].shape[0] == sum(views)
    tokens = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert tokens == [v * model.config.num_image_tokens for v in views]
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grids"]).pooler_output
        assert [f.shape[0] for f in features] == tokens
        model(**batch)  # the model's own count check passes
    # each view's image tokens follow its marker
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text.index("global:") < text.index("tile 1,1:") < text.index("tile 1,2:")


def test_region_features_equal_roi_align_on_stitched_map(tiled):
    model, processor = tiled
    ip = processor.image_processor
    images = [_picture((200, 90)), _picture((100, 400)), _picture((40, 40))]
    inputs = ip(images)
    g = model.config.patch_grid_size
    with torch.no_grad():
        views = model.model.get_patch_features(inputs["pixel_values"])  # (views, g, g, d)
        pixel_boxes = [[[10, 5, 150, 80], [100, 0, 200, 90]], [[5, 300, 90, 399]], [[3, 4, 30, 35]]]
        model_boxes = [ip.to_model_space(b, im.size) for b, im in zip(pixel_boxes, images)]
        ours = model.get_region_features(inputs["pixel_values"], model_boxes, output_size=3,
                                         image_grids=inputs["image_grids"])
        # The stitched map built independently: tiles concatenated along columns, then rows (the thumbnail skipped).
        expected, start = [], 0
        for (rows, cols), boxes, image in zip(inputs["image_grids"].tolist(), pixel_boxes, images):
            n = num_views((rows, cols))
            tiles = views[start + (n > 1) : start + n]
            start += n
            stitched = torch.cat([torch.cat(list(tiles[r * cols : (r + 1) * cols]), dim=1) for r in range(rows)], dim=0)
            assert stitched.shape[:2] == (rows * g, cols * g)
            scale = torch.tensor([cols * g / image.width, rows * g / image.height] * 2)  # original pixels -> map
            rois = torch.tensor(boxes, dtype=torch.float32) * scale
            expected.append(roi_align(stitched.permute(2, 0, 1)[None], [rois], output_size=3, aligned=True))
        torch.testing.assert_close(ours, torch.cat(expected), rtol=1e-5, atol=1e-5)
        # Known answer: the box of tile (1, 2) of the 200 x 90 image is that tile's whole patch grid (2 x 2 output:
        # the samples fall on patch centres, none between two tiles).
        tile = views[2].permute(2, 0, 1)[None]  # view 0 thumbnail, 1 tile (1,1), 2 tile (1,2)
        whole = roi_align(tile, [torch.tensor([[0.0, 0.0, g, g]])], output_size=2, aligned=True)
        second_tile = model.get_region_features(inputs["pixel_values"], [b[1:2] if i == 0 else b[:0] for i, b in
                                                                         enumerate(model_boxes)],
                                                output_size=2, image_grids=inputs["image_grids"])
        torch.testing.assert_close(second_tile, whole, rtol=1e-5, atol=1e-5)
        # (K, 5) boxes in any order give the same features as the per-image list
        indexed = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(model_boxes)])
        shuffled = torch.tensor([3, 0, 2, 1])
        torch.testing.assert_close(
            model.get_region_features(inputs["pixel_values"], indexed[shuffled], output_size=3,
                                      image_grids=inputs["image_grids"]), ours[shuffled])


@pytest.mark.parametrize("box_format", BOX_FORMATS)
def test_boxes_stay_normalized_to_the_original_image(tiled_checkpoints, box_format):
    processor = GranViTProcessor.from_pretrained(tiled_checkpoints(box_format))
    size, box = (200, 90), [13.0, 7.0, 151.0, 88.0]
    untiled_text = processor.encode_box(box, size)
    processor.image_processor.max_tiles = 0
    assert processor.encode_box(box, size) == untiled_text  # the prompt's box does not depend on tiling
    processor.image_processor.max_tiles = MAX_TILES
    [decoded] = processor.decode_boxes("answer " + untiled_text, size)
    half_bin = torch.tensor([size[0], size[1]] * 2) / processor.num_coord_bins / 2
    assert (torch.tensor(decoded) - torch.tensor(box)).abs().le(half_bin + 1e-4).all()
    ip = processor.image_processor
    model_box = ip.to_model_space([box], size)
    torch.testing.assert_close(model_box, torch.tensor([[13 / 200, 7 / 90, 151 / 200, 88 / 90]]))  # the stitched map
    torch.testing.assert_close(ip.from_model_space(model_box, size), torch.tensor([box]))


def test_tiled_checkpoint_refuses_untiled_input(tiled, tiny_model_and_processor):
    model, processor = tiled
    image = _picture((200, 90))
    batch = processor(images=[image], text=[processor.vqa_prompt("what?")])
    untiled = processor.image_processor(image, max_tiles=0)["pixel_values"]
    with pytest.raises(ValueError, match=r"pixel_values with 1 view\(s\) came without image_grids.*max_tiles=4"):
        model(input_ids=batch["input_ids"], pixel_values=untiled)
    with pytest.raises(ValueError, match="came without image_grids"):
        model.get_region_features(untiled, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    with pytest.raises(ValueError, match=r"pixel_values has 3 views but image_grids \[\[2, 2\]\] need 5"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_grids=torch.tensor([[2, 2]]))
    plain_model, _ = tiny_model_and_processor
    with pytest.raises(ValueError, match=r"image_grids were given, but this checkpoint does not tile"):
        plain_model(**processor(images=[image], text=["what?"]))


def test_dense_region_apis_with_tiling(tiled):
    model, processor = tiled
    image = _picture((200, 90))
    prompts = [processor.caption2bbox_prompt("red"), processor.bbox2caption_prompt([10, 5, 150, 80], image.size)]
    dense = model.dense_generate(processor, image, prompts, max_new_tokens=4)
    for prompt, answer in zip(prompts, dense):  # token-identical to generate on each prompt
        batch = processor(images=[image], text=[prompt])
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)[0, batch["input_ids"].shape[1]:].tolist()
        eos = processor.tokenizer.eos_token_id
        assert answer == (out[: out.index(eos) + 1] if eos in out else out)
    assert [len(b) for b in model.ground(processor, image, ["red", "blue"])] == [1, 1]  # the box grammar still holds


def test_stage1_batch_keeps_crops_single_and_features_on_the_stitched_map(tiled):
    from granvit.train.data.tasks import TaskCollator

    model, processor = tiled
    image = _picture((200, 90))
    boxes = [[10.0, 5.0, 150.0, 80.0], [100.0, 0.0, 200.0, 90.0]]
    example = {"image": image, "prompt": processor.bbox2caption_prompt(boxes[0], image.size), "target": "red",
               "boxes": boxes, "model_boxes": processor.image_processor.to_model_space(boxes, image.size).tolist(),
               "crops": [image.crop(tuple(int(v) for v in b)) for b in boxes]}
    batch = TaskCollator(processor)([example])
    assert batch["crop_pixel_values"].shape == (2, 3, 64, 64)  # the teacher sees each crop as one square
    torch.testing.assert_close(batch["crop_extents"], torch.tensor([[1.0, 75 / 140], [1.0, 0.9]]))
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grids")})
        student_patches = out.image_outputs.last_hidden_state.reshape(-1, 4, 4, model.config.vision_config.hidden_size)
        from_forward = model.get_region_features(boxes=batch["region_boxes"], patch_features=student_patches,
                                                 image_grids=batch["image_grids"])
        direct = model.get_region_features(batch["pixel_values"], batch["region_boxes"], image_grids=batch["image_grids"])
    torch.testing.assert_close(from_forward, direct)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["granvit"] = None  # only the checkpoint's own code
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    ckpt, ref_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)  # the parent's: bitwise equality needs the same reduction order
    ref = torch.load(ref_path)
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True).eval()
    image = Image.new("RGB", (200, 90), "red")
    batch = processor(images=[image], text=[processor.vqa_prompt("what?")])
    report = {"module": type(model).__module__, "grids": batch["image_grids"].tolist(),
              "same_inputs": torch.equal(batch["input_ids"], ref["input_ids"])}
    with torch.no_grad():
        report["logits_equal"] = torch.equal(model(**batch).logits, ref["logits"])
        boxes = processor.image_processor.to_model_space([[10, 5, 150, 80]], image.size)
        features = model.get_region_features(batch["pixel_values"], [boxes], image_grids=batch["image_grids"])
        report["regions_equal"] = torch.equal(features, ref["regions"])
    report["generate_equal"] = torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref["generated"])
    try:
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    except ValueError as err:
        report["refusal"] = str(err)
    pipe = pipeline("image-text-to-text", model=ckpt, trust_remote_code=True)  # image_grids flow into generate
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    report["pipeline_roles"] = [m["role"] for m in pipe(text=messages, max_new_tokens=2)[0]["generated_text"]]
    print("REPORT " + json.dumps(report))
    """
)


def test_fresh_process_remote_code_load_of_a_tiled_checkpoint(tmp_path, tiled_checkpoints):
    checkpoint = tiled_checkpoints("text")
    model = GranViTForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = GranViTProcessor.from_pretrained(checkpoint)
    image = Image.new("RGB", (200, 90), "red")
    batch = processor(images=[image], text=[processor.vqa_prompt("what?")])
    with torch.no_grad():
        boxes = processor.image_processor.to_model_space([[10, 5, 150, 80]], image.size)
        reference = {"input_ids": batch["input_ids"], "logits": model(**batch).logits,
                     "regions": model.get_region_features(batch["pixel_values"], [boxes], image_grids=batch["image_grids"]),
                     "generated": model.generate(**batch, max_new_tokens=3, do_sample=False)}
    torch.save(reference, tmp_path / "reference.pt")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), str(checkpoint), str(tmp_path / "reference.pt"),
                             str(torch.get_num_threads())],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["module"].startswith("transformers_modules.") and report["grids"] == [[1, 2]]
    assert report["same_inputs"] and report["logits_equal"] and report["regions_equal"] and report["generate_equal"]
    assert "came without image_grids" in report["refusal"] and "max_tiles=4" in report["refusal"]
    assert report["pipeline_roles"] == ["user", "assistant"]


def test_exported_encoder_documents_tiling(tmp_path, tiled_checkpoints):
    from granvit.hub.export_encoder import main as export_main

    export_main([str(tiled_checkpoints("tokens")), str(tmp_path / "vit")])
    readme = (tmp_path / "vit" / "README.md").read_text()
    assert "trained with up to 4 tiles" in readme and "select_tile_grid" in readme
    assert (tmp_path / "vit" / "tiling_granvit.py").is_file()


def test_experiment_smoke_runs_both_arms_side_by_side(tmp_path, capsys):
    """experiments/tiling.py --smoke with two worker processes: each arm's JSON and log, the summary, then a rerun that
    skips both."""
    from granvit.experiments import tiling

    tiling.main(["--smoke", "--seeds", "0", "--out", str(tmp_path), "--jobs", "2"])
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert set(runs) == {"untiled_seed0", "tiled4_seed0"}
    assert runs["untiled_seed0"]["max_tiles"] == 0 and runs["tiled4_seed0"]["max_tiles"] == 4
    assert all(r["steps"] == 4 and 0 <= r["ocr"]["reading_anls"] <= 1 for r in runs.values())
    assert all((tmp_path / "runs" / f"{name}.log").stat().st_size > 0 for name in runs)  # each worker's own output
    assert "tiled4 (seeds 0)" in (tmp_path / "summary.md").read_text()
    out = capsys.readouterr().out
    assert "done untiled seed 0 in" in out and "done tiled4 seed 0 in" in out
    tiling.main(["--smoke", "--seeds", "0", "--out", str(tmp_path), "--jobs", "2"])
    assert "2 skipped" in capsys.readouterr().out
