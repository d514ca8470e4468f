"""The Space app through its public API (gradio_client), in-process, on the tiny checkpoint."""

import socket
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from granvit.spaces import app as space_app
from PIL import Image

WIDTH, HEIGHT = 120, 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def annotation(path, boxes):
    """The image_annotator value as the API takes it (colour must be an "rgb(r, g, b)" string)."""
    return {
        "image": handle_file(str(path)),
        "boxes": [
            {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2, "label": "", "color": "rgb(255, 0, 0)"}
            for x1, y1, x2, y2 in boxes
        ],
    }


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    image.paste((200, 20, 20), (10, 10, 50, 40))
    image.paste((20, 20, 200), (60, 20, 110, 70))
    path = tmp_path_factory.mktemp("space") / "shapes.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(GranViTDemo, gradio_client.Client) with the app running in this process."""
    demo_model = space_app.GranViTDemo(str(tiny_checkpoint))
    demo = space_app.build_demo(demo_model)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        yield demo_model, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_loads_through_auto_classes_with_remote_code(served):
    demo_model, _ = served
    assert type(demo_model.model).__name__ == "GranViTForConditionalGeneration"
    assert type(demo_model.processor).__name__ == "GranViTProcessor"


def test_describe_regions_one_batched_call_equals_independent_generate(served, image_path, monkeypatch):
    demo_model, client = served
    model, processor = demo_model.model, demo_model.processor
    boxes = [[10, 10, 50, 40], [60, 20, 110, 70], [0, 0, 120, 80]]
    calls = []
    dense = model.describe_regions
    monkeypatch.setattr(
        model, "describe_regions", lambda proc, img, bxs, **kw: calls.append(bxs) or dense(proc, img, bxs, **kw)
    )
    annotated, regions = client.predict(annotation(image_path, boxes), api_name="/describe_regions")
    assert calls == [boxes]  # all boxes in one call
    assert [r["box"] for r in regions] == boxes
    image = Image.open(image_path).convert("RGB")
    expected = []
    for box in boxes:  # the reference: one plain generate call per box
        inputs = processor(images=[image], text=[processor.bbox2caption_prompt(box, image.size)])
        out = model.generate(**inputs, max_new_tokens=space_app.CAPTION_TOKENS, do_sample=False)
        answer = out[:, inputs["input_ids"].shape[1] :]
        expected.append(demo_model.readable(processor.batch_decode(answer, skip_special_tokens=True)[0], image.size))
    assert [r["caption"] for r in regions] == expected
    assert [a["label"] for a in annotated["annotations"]] == [f"{i}: {c}" for i, c in enumerate(expected, 1)]


def test_find_draws_the_models_boxes_with_their_scores(served, image_path):
    demo_model, client = served
    annotated, found, answer = client.predict(handle_file(str(image_path)), "the red square", api_name="/find")
    assert found["phrase"] == "the red square" and found["found"] is True
    # The checkpoint's own answer, as model.ground gives it directly (the Space adds nothing but the budget and cap).
    budget = (demo_model.processor.max_box_tokens + 2) * space_app.MAX_FOUND_BOXES + 1
    [direct] = demo_model.model.ground(demo_model.processor, Image.open(image_path).convert("RGB"), ["the red square"],
                                       max_new_tokens=budget, return_scores=True)
    assert found["boxes"] == direct["boxes"][: space_app.MAX_FOUND_BOXES]
    assert found["scores"] == direct["scores"][: space_app.MAX_FOUND_BOXES]
    assert 1 <= len(found["boxes"])  # the box grammar: an answer always has a box
    labels = [a["label"] for a in annotated["annotations"]]
    assert labels == [f"{i}: the red square ({s:.2f})" for i, s in enumerate(found["scores"], 1)]
    assert answer.startswith("**Found**") and f"{found['scores'][0]:.2f}" in answer


def test_find_answers_not_found_below_the_threshold(served, image_path):
    _, client = served
    annotated, found, answer = client.predict(handle_file(str(image_path)), "a dog", 1.0, api_name="/find")
    assert found == {"phrase": "a dog", "boxes": [], "scores": [], "found": False}
    assert annotated["annotations"] == [] and answer.startswith("**Not found**")


def test_ask_matches_direct_call(served, image_path):
    demo_model, client = served
    answer = client.predict(handle_file(str(image_path)), "what colour is the left square?", api_name="/ask")
    assert answer == demo_model.ask(Image.open(image_path), "what colour is the left square?")


def test_region_similarity_heatmap(served, image_path):
    demo_model, client = served
    heatmap_path, stats = client.predict(annotation(image_path, [[10, 10, 50, 40]]), api_name="/region_similarity")
    heatmap = Image.open(heatmap_path)
    assert heatmap.size == (WIDTH, HEIGHT)
    assert stats["box"] == [10, 10, 50, 40]
    sim = demo_model.similarity(Image.open(image_path).convert("RGB"), [10, 10, 50, 40])  # (H, W), as the API computed it
    inside = sim[10:40, 10:50]
    outside = (sim.sum() - inside.sum()) / (sim.size - inside.size)
    assert stats["min"] == pytest.approx(float(sim.min())) and stats["max"] == pytest.approx(float(sim.max()))
    assert stats["mean_inside"] == pytest.approx(float(inside.mean()), rel=1e-5)
    assert stats["mean_outside"] == pytest.approx(float(outside), rel=1e-5)


def test_similarity_peaks_on_a_patch_like_the_box(served):
    """A box on one patch of a repeated texture is most similar to the identical patches, not to a blank one."""
    demo_model, _ = served
    size = demo_model.processor.image_processor.image_size  # 64 px, 16 px patches: a 4 x 4 grid
    image = Image.new("RGB", (size, size), "white")
    image.paste((255, 0, 0), (0, 0, 16, 16))
    sim = demo_model.similarity(image, [0, 0, 16, 16])
    assert sim.shape == (size, size)
    assert sim[:16, :16].mean() > sim[40:, 40:].mean()


@pytest.mark.parametrize(
    ("inputs", "api_name", "message"),
    [
        (lambda p: [None], "/describe_regions", "No image"),
        (lambda p: [annotation(p, [])], "/describe_regions", "No box"),
        (lambda p: [annotation(p, [[50, 10, 10, 40]])], "/describe_regions", "Box 1 is invalid"),
        (lambda p: [annotation(p, [[10, 10, 500, 40]])], "/describe_regions", "outside"),
        (lambda p: [annotation(p, [[0, 0, 5 + i, 5 + i] for i in range(17)])], "/describe_regions", "limit is 16"),
        (lambda p: [annotation(p, [[0, 0, 5, 5], [5, 5, 9, 9]])], "/region_similarity", "limit is 1"),
        (lambda p: [handle_file(str(p)), "   "], "/find", "Empty phrase"),
        (lambda p: [None, "the red square"], "/find", "No image"),
        (lambda p: [handle_file(str(p)), ""], "/ask", "Empty question"),
        (lambda p: [handle_file(str(p)), "x" * 301], "/ask", "limit is 300"),
    ],
)
def test_bad_input_gives_a_clear_error(served, image_path, inputs, api_name, message):
    _, client = served
    with pytest.raises(AppError, match=message):
        client.predict(*inputs(image_path), api_name=api_name)


def test_image_over_the_pixel_limit_is_rejected(served, image_path, monkeypatch):
    _, client = served
    monkeypatch.setattr(space_app, "MAX_IMAGE_PIXELS", WIDTH * HEIGHT - 1)
    with pytest.raises(AppError, match=r"120x80 = 0.0 MP; this demo accepts up to"):
        client.predict(handle_file(str(image_path)), "what?", api_name="/ask")


def test_32_concurrent_requests_are_all_answered(served, image_path):
    _, client = served
    start = time.time()
    jobs = [
        client.submit(annotation(image_path, [[10, 10, 50, 40], [60, 20, 110, 70]]), api_name="/describe_regions")
        if i % 2
        else client.submit(handle_file(str(image_path)), f"square {i}", api_name="/find")
        for i in range(32)
    ]
    _, not_done = wait([job.future for job in jobs], timeout=90)
    assert not not_done, f"{len(not_done)} of 32 requests unanswered after {time.time() - start:.0f} s"
    results = [job.result() for job in jobs]
    assert all(len(r[1]["boxes"]) >= 1 for r in results[0::2])
    assert all(len(r[1]) == 2 for r in results[1::2])
    # The server is still alive and answers a fresh request.
    assert client.predict(handle_file(str(image_path)), "still there?", api_name="/ask") is not None


def test_resolve_model_order_and_untrained_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANVIT_MODEL", "org/from-env")
    assert space_app.resolve_model("org/from-arg") == ("org/from-arg", False)
    assert space_app.resolve_model(None) == ("org/from-env", False)
    monkeypatch.delenv("GRANVIT_MODEL")
    monkeypatch.setattr(space_app, "DEFAULT_MODEL", str(tmp_path / "missing"))
    monkeypatch.setattr(space_app, "UNTRAINED_DIR", tmp_path / "untrained")
    path, untrained = space_app.resolve_model(None)
    assert untrained and (tmp_path / "untrained" / "granvit" / "config.json").exists()
    assert space_app.resolve_model(None) == (path, True)  # built once, reused on the next launch


def test_untrained_banner_only_when_untrained(served):
    demo_model, _ = served

    def banner_ids(untrained):
        demo = space_app.build_demo(demo_model, untrained=untrained)
        return [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "untrained_banner"]

    assert banner_ids(True) == ["untrained_banner"] and banner_ids(False) == []


def test_every_event_has_an_api_name(served):
    _, client = served
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/describe_regions", "/find", "/ask", "/region_similarity"} <= endpoints


# ---- examples, trained tasks, readable answers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory, image_path):
    """A checkpoint-like folder holding only demo examples (what the training job writes next to the weights)."""
    from granvit.spaces.demo_examples import write_demo_examples

    folder = tmp_path_factory.mktemp("with-examples")
    rows = [{"image": Image.open(image_path), "width": WIDTH, "height": HEIGHT, "image_id": "shapes",
             "regions": [{"bbox": [10, 10, 50, 40], "caption": "a red square"},
                         {"bbox": [60, 20, 110, 70], "caption": " the blue square "},
                         {"bbox": [0, 0, 5, 5], "caption": ""}]},                      # no caption: left out
            {"image": {"bytes": image_path.read_bytes(), "path": None}, "width": WIDTH, "height": HEIGHT,
             "image_id": "again", "regions": [{"bbox": [0, 0, 120, 80], "caption": "two squares"}]}]
    write_demo_examples(folder, rows, n=4)
    return folder


@pytest.fixture(scope="module")
def served_trained(tiny_checkpoint, examples_dir):
    """The app on a checkpoint that records it learned region captions and grounding only, with examples."""
    demo_model = space_app.GranViTDemo(str(tiny_checkpoint))
    demo_model.model.config.trained_tasks = ["bbox2caption", "caption2bbox"]
    demo = space_app.build_demo(demo_model, examples=space_app.find_examples(str(examples_dir)))
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        yield demo, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_examples_written_next_to_the_checkpoint(examples_dir):
    examples = space_app.find_examples(str(examples_dir))
    assert [(Path(e["image"]).name, e["image_id"], e["width"], e["height"]) for e in examples] == [
        ("0.png", "shapes", WIDTH, HEIGHT), ("1.png", "again", WIDTH, HEIGHT)]
    assert examples[0]["regions"] == [{"bbox": [10.0, 10.0, 50.0, 40.0], "caption": "a red square"},
                                      {"bbox": [60.0, 20.0, 110.0, 70.0], "caption": "the blue square"}]
    assert Image.open(examples[1]["image"]).getpixel((20, 20)) == (200, 20, 20)  # lossless copy of the image
    (examples_dir / "no-examples").mkdir(exist_ok=True)
    assert space_app.find_examples(str(examples_dir / "no-examples")) == []


def test_clicking_an_example_fills_boxes_and_phrase(served_trained):
    _, client = served_trained
    described = client.predict(0, api_name="/describe_example")["value"]
    assert [[b["xmin"], b["ymin"], b["xmax"], b["ymax"], b["label"]] for b in described["boxes"]] == [
        [10, 10, 50, 40, "a red square"], [60, 20, 110, 70, "the blue square"]]
    image, phrase = client.predict(1, api_name="/find_example")
    assert phrase["value"] == "two squares" and Image.open(image["value"]).size == (WIDTH, HEIGHT)


def test_a_tab_the_checkpoint_was_not_trained_for_says_so(served_trained, image_path):
    demo, client = served_trained
    notes = {b.elem_id: b.value for b in demo.blocks.values() if str(getattr(b, "elem_id", "")).endswith("_untrained")}
    assert list(notes) == ["ask_untrained"]
    assert "not trained to answer questions about an image" in notes["ask_untrained"]
    buttons = {b.elem_id: b.interactive for b in demo.blocks.values() if getattr(b, "elem_id", None) in
               ("describe_btn", "find_btn", "ask_btn")}
    assert buttons == {"describe_btn": True, "find_btn": True, "ask_btn": False}
    with pytest.raises(AppError, match="not trained to answer questions"):
        client.predict(handle_file(str(image_path)), "what colour?", api_name="/ask")
    _, found, _ = client.predict(handle_file(str(image_path)), "the red square", api_name="/find")  # trained: answers
    assert len(found["boxes"]) >= 1


def test_answers_show_boxes_as_pixels_never_raw_tokens(served):
    demo_model, _ = served  # 100 coordinate bins; a 200 x 200 image: bin b decodes to (b + 0.5) * 2 pixels
    text = {"tokens": "</box>the <box><coord_1><coord_2><coord_50><coord_60></box> cat <coord_3>",
            "text": "the [1, 2, 50, 60] cat"}[demo_model.processor.box_format]
    assert demo_model.readable(text, (200, 200)) == "the [3, 5, 101, 121] cat"
    assert demo_model.readable("</box>", (200, 200)) == "(no answer: the model replied with box tokens only)"


def test_atomic_image_cache_still_fits_gradio(tmp_path, monkeypatch):
    """The one gradio internal the Space replaces (`processing_utils.save_pil_to_cache`, see spaces/app.py): gradio must
    still send its image outputs through that module function, and the atomic twin must write what gradio's own writes."""
    import gradio as gr
    from gradio import processing_utils

    image = Image.new("RGB", (12, 8), "red")
    ours = space_app.save_pil_to_cache_atomically(image, str(tmp_path / "ours"), name="x", format="png")
    theirs = space_app._GRADIO_SAVE_PIL_TO_CACHE(image, str(tmp_path / "theirs"), name="x", format="png")
    assert Path(ours).relative_to(tmp_path / "ours") == Path(theirs).relative_to(tmp_path / "theirs")
    assert Path(ours).read_bytes() == Path(theirs).read_bytes()
    assert [p.name for p in Path(ours).parent.iterdir()] == ["x.png"]  # no temporary file left behind

    calls = []
    monkeypatch.setattr(processing_utils, "save_pil_to_cache", lambda img, cache_dir, **kw: calls.append(kw) or
                        space_app.save_pil_to_cache_atomically(img, cache_dir, **kw))
    gr.AnnotatedImage().postprocess((image, [((1, 1, 5, 5), "a box")]))
    gr.Image(type="pil").postprocess(image)
    assert len(calls) == 3  # the AnnotatedImage base and its mask, then the Image output


def test_similarity_with_tiling_covers_the_original_image(tmp_path):
    """A tiled checkpoint's heat map comes from the stitched tile map, which covers exactly the original image."""
    from granvit.train.tiny import build_tiny_checkpoint

    demo_model = space_app.GranViTDemo(str(build_tiny_checkpoint(tmp_path, max_tiles=4)))
    image = Image.new("RGB", (128, 64), "white")  # 2 tiles of 64 px side by side: 16 px patches stay 16 px
    image.paste((255, 0, 0), (80, 16, 96, 32))
    sim = demo_model.similarity(image, [80, 16, 96, 32])
    assert sim.shape == (64, 128)
    assert sim[16:32, 80:96].mean() > sim[40:, :40].mean()
    assert len(demo_model.model.describe_regions(demo_model.processor, image, [[80, 16, 96, 32]], max_new_tokens=2)) == 1
