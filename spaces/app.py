"""GranViT region demo (Hugging Face Space): describe boxes, find phrases, ask questions, see region similarity.

    python spaces/app.py                                  # the tiny checkpoint of the quickstart job
    python spaces/app.py --model org/granvit              # a Hub checkpoint (trust_remote_code)
    GRANVIT_MODEL=./my-checkpoint PORT=7861 python spaces/app.py

A Space runs from a checkpoint, not from the granvit package: the model and processor come from the checkpoint's own
Hub files through ``AutoModelForImageTextToText`` / ``AutoProcessor`` with ``trust_remote_code=True``, on purpose:
the Space exists to run that checkpoint's code. ``GRANVIT_TRUST_REMOTE_CODE=0`` refuses it (then only a checkpoint
type that the installed transformers, or an installed granvit package, provides will load). The one exception is the
fallback below: with the default model missing, an untrained tiny checkpoint is built with the package (if
installed) so the UI can be tried, and the page says so.

Find shows each box's score (grounding_granvit.py: from the probabilities of its tokens, not calibrated) and answers
"not found" when the model says so (a checkpoint trained with negatives) or when no box reaches the score threshold
(a slider; its default is ``GRANVIT_FIND_THRESHOLD``, else 0: only the model's own "not found").

The page opens with clickable examples (held-out images with their true boxes and phrases, ``demo_examples.py``):
those shipped in this folder (``examples/``, by ``granvit-push``), else those next to the checkpoint. A tab whose task
the checkpoint was not trained on (``config.trained_tasks``) says so instead of answering.

Boxes are ``[x1, y1, x2, y2]`` in pixels of the image as uploaded, everywhere in the UI and the API.
"""

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from gradio import processing_utils
from gradio_image_annotation import image_annotator
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from PIL import Image, ImageDraw, ImageOps
from transformers import AutoModelForImageTextToText, AutoProcessor

if __package__:  # granvit-demo, or imported as granvit.spaces.app: the package's console convention
    from ..console import UserError, check_model_source, console_main
    from .demo_examples import EXAMPLES_DIR, load_demo_examples
else:  # `python app.py` in a Space: this folder is on sys.path, and there is no granvit package
    from demo_examples import EXAMPLES_DIR, load_demo_examples

    class UserError(SystemExit):
        """Without the package a user error prints its message and exits (the Space's log shows it)."""

    def console_main(main):
        return main

    def check_model_source(value, option):
        return value

# The checkpoint the quickstart training job writes (relative to the repository root).
DEFAULT_MODEL = "outputs/quickstart/checkpoint"
UNTRAINED_DIR = Path(tempfile.gettempdir()) / "granvit-space-untrained-tiny"

MAX_IMAGE_PIXELS = int(os.environ.get("GRANVIT_MAX_IMAGE_PIXELS", str(4096 * 4096)))
MAX_BOXES = 16  # boxes per Describe call: they are decoded as one batch
MAX_FOUND_BOXES = 4  # boxes per Find answer
FIND_THRESHOLD = float(os.environ.get("GRANVIT_FIND_THRESHOLD", "0"))  # the slider's default (module docstring)
MAX_TEXT_CHARS = 300
CAPTION_TOKENS = 24  # the Bbox2Caption prompt asks for at most 10 words
ANSWER_TOKENS = 48
CONCURRENCY = int(os.environ.get("GRANVIT_CONCURRENCY", "1"))  # generate calls at once; more just share the same cores
QUEUE_SIZE = int(os.environ.get("GRANVIT_QUEUE_SIZE", "64"))
TRUST_REMOTE_CODE = os.environ.get("GRANVIT_TRUST_REMOTE_CODE", "1") != "0"  # see the module docstring

# What each tab asks of the model, by the task names of `config.trained_tasks` (train/data/tasks.py).
TASKS = {"bbox2caption": "describe a region (box -> caption)", "caption2bbox": "find a phrase (caption -> box)",
         "caption2bbox_negative": 'answer "not found" for a phrase naming nothing in the image',
         "vqa": "answer questions about an image"}


# ---- model -------------------------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> tuple[str, bool]:
    """(Hub id or folder to load, untrained?). Only the default path falls back to an untrained tiny build."""
    model = model or os.environ.get("GRANVIT_MODEL")
    if model:
        return model, False
    default = Path(__file__).resolve().parent.parent / DEFAULT_MODEL
    if (default / "config.json").exists():
        return str(default), False
    if (UNTRAINED_DIR / "granvit" / "config.json").exists():
        return str(UNTRAINED_DIR / "granvit"), True
    try:
        from granvit.train.tiny import build_tiny_checkpoint
    except ImportError as err:
        raise UserError(
            f"No model: {default} does not exist, GRANVIT_MODEL / --model are unset, and the granvit package "
            f"(needed to build an untrained tiny demo checkpoint) is not installed ({err}). "
            "Run the quickstart job, or pass --model <Hub id or checkpoint folder>."
        ) from None
    print(f"{default} not found: building an UNTRAINED tiny checkpoint in {UNTRAINED_DIR} (outputs are noise)")
    return str(build_tiny_checkpoint(UNTRAINED_DIR)), True


class GranViTDemo:
    """The model calls behind the four tabs; inputs are PIL images and boxes in original pixels."""

    def __init__(self, model_id: str, trust_remote_code: bool = TRUST_REMOTE_CODE):
        self.model_id = model_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        requested = os.environ.get("GRANVIT_DTYPE", "auto")
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, trust_remote_code=trust_remote_code, dtype=requested
        )
        # The checkpoint's own rule (GranViTPreTrainedModel.inference_dtype): bf16 where the hardware runs it fast.
        dtype = model.inference_dtype(self.device) if requested == "auto" else model.dtype
        self.model = model.to(self.device, dtype).eval()
        self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)

    def untrained_note(self, task: str) -> str | None:
        """A plain sentence when the checkpoint records its trained tasks and ``task`` is not one of them."""
        trained = getattr(self.model.config, "trained_tasks", None)
        if trained is None or task in trained:
            return None
        learned = "; ".join(TASKS.get(t, t) for t in trained) or "no task"
        return f"This checkpoint was not trained to {TASKS[task]}, so this tab is off. It was trained to: {learned}."

    def describe(self, image: Image.Image, boxes: list[list[float]]) -> list[str]:
        """One caption per box from the model's dense API: one image encode, one shared prefill, one decode batch."""
        with torch.inference_mode():
            captions = self.model.describe_regions(self.processor, image, boxes, max_new_tokens=CAPTION_TOKENS)
        return [self.readable(caption, image.size) for caption in captions]

    def find(self, image: Image.Image, phrase: str, threshold: float = 0.0) -> dict:
        """``{"boxes": [...], "scores": [...]}``: the region(s) a phrase describes (original pixels), at most
        MAX_FOUND_BOXES, each with its score; boxes scoring below ``threshold`` are dropped. No box: "not found".

        ``ground`` decodes under the model's box grammar (the answer starts with a well-formed box, or is "not found"
        for a checkpoint trained with negatives), so an answer always parses, even from an undertrained checkpoint.
        """
        with torch.inference_mode():
            budget = (self.processor.max_box_tokens + 2) * MAX_FOUND_BOXES + 1
            [found] = self.model.ground(self.processor, image, [phrase], max_new_tokens=budget, return_scores=True,
                                        threshold=threshold)
        return {key: values[:MAX_FOUND_BOXES] for key, values in found.items()}

    def ask(self, image: Image.Image, question: str) -> str:
        inputs = self.processor(images=[image], text=[self.processor.vqa_prompt(question)]).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
        answer = out[:, inputs["input_ids"].shape[1] :]
        return self.readable(self.processor.batch_decode(answer, skip_special_tokens=True)[0], image.size)

    def readable(self, text: str, image_size: tuple[int, int]) -> str:
        """An answer as a person reads it: each well-formed box as its pixel coordinates, no stray box tokens."""

        def pixels(match):
            [box] = self.processor.decode_boxes(match.group(0), image_size) or [None]
            return "" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box) + "]"

        # pieces of the 6-token box format left outside a well-formed box go (the checkpoint's codec knows them)
        text = self.processor.codec.strip_box_tokens(self.processor.box_pattern.sub(pixels, text))
        return text or "(no answer: the model replied with box tokens only)"

    def similarity(self, image: Image.Image, box: list[float]) -> np.ndarray:
        """Cosine similarity between the box's region feature and every ViT patch, as an (H, W) map on the image."""
        image_processor = self.processor.image_processor
        inputs = image_processor([image])
        grids = inputs.get("image_grids")
        with torch.inference_mode():
            [feature_map] = self.model.model.get_feature_maps(inputs["pixel_values"].to(self.device), grids)  # (H, W, d)
            model_box = image_processor.to_model_space([box], image.size).to(self.device)  # (1, 4) in [0, 1]
            region = self.model.get_region_features(boxes=[model_box], output_size=7,
                                                    patch_features=feature_map[None])  # one map: no grid to stitch
            region = region.mean(dim=(2, 3))  # (1, d): ROIAlign grid averaged into one region vector
            sim = F.cosine_similarity(feature_map.float(), region[0].float(), dim=-1)  # (H, W)
        if grids is None:  # patch grid -> the padded square -> crop the image content (top-left)
            size = image_processor.image_size
            square = F.interpolate(sim[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            content_w, content_h = image_processor.resized_size(image.size)
            sim = square[:content_h, :content_w]
        # (with tiling the stitched tile map already covers exactly the image) -> original size
        full = F.interpolate(sim[None, None], size=(image.height, image.width), mode="bilinear")
        return full[0, 0].clamp(-1, 1).cpu().numpy()


def find_examples(model_id: str) -> list[dict]:
    """Examples shipped with the Space (``./examples``) win; else those next to the checkpoint (a local folder, or
    the model repo's ``examples/`` on the Hub); [] when there are none."""
    shipped = load_demo_examples(Path(__file__).resolve().parent / EXAMPLES_DIR)
    if shipped or os.path.isdir(model_id):
        return shipped or load_demo_examples(Path(model_id) / EXAMPLES_DIR)
    try:
        folder = snapshot_download(model_id, allow_patterns=[f"{EXAMPLES_DIR}/*"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as err:  # the demo works without them
        print(f"No demo examples from {model_id}: {type(err).__name__}: {err}")
        return []
    return load_demo_examples(Path(folder) / EXAMPLES_DIR)


def annotator_value(example: dict) -> dict:
    """An example as the image_annotator's value: the image and its true boxes, labelled with their captions."""
    boxes = [{"xmin": r["bbox"][0], "ymin": r["bbox"][1], "xmax": r["bbox"][2], "ymax": r["bbox"][3],
              "label": r["caption"]} for r in example["regions"]]
    return {"image": example["image"], "boxes": boxes}


# ---- gradio adapter: atomic image cache writes --------------------------------------------------------------------
# gradio 6.31 caches each output image (Image outputs, AnnotatedImage bases and masks) under a hash of its bytes and
# rewrites that file in place for every request; when two requests produce the same image (same upload, same boxes),
# one client downloads the file while the other request truncates it and gets an empty body (found by the 32-request
# load test). gradio has no public option for this, so `use_atomic_image_cache` swaps its module function
# `processing_utils.save_pil_to_cache` for a twin that writes a temporary file and renames it into place (a reader
# sees the old complete file or the new one). tests/test_space.py checks that gradio still routes its image outputs
# through that function and that the twin returns the path and bytes gradio's own would: if gradio changes, it fails.
_GRADIO_SAVE_PIL_TO_CACHE = processing_utils.save_pil_to_cache


def save_pil_to_cache_atomically(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """gradio's ``processing_utils.save_pil_to_cache``, written to a temporary file and renamed into place."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)
    return str(path)


def use_atomic_image_cache() -> None:
    """Make gradio write cached output images atomically (see above); called by ``build_demo``."""
    processing_utils.save_pil_to_cache = save_pil_to_cache_atomically


# ---- input checks and drawing ------------------------------------------------------------------------------------
def check_image(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise gr.Error("No image: upload an image first.")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise gr.Error(
            f"Image is {image.width}x{image.height} = {image.width * image.height / 1e6:.1f} MP; this demo accepts up "
            f"to {MAX_IMAGE_PIXELS / 1e6:.1f} MP. Downscale it and upload again."
        )
    return image.convert("RGB")


def check_text(text: str | None, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise gr.Error(f"Empty {what}: type a {what} first.")
    if len(text) > MAX_TEXT_CHARS:
        raise gr.Error(f"The {what} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}.")
    return text


def read_annotation(value: dict | None, processor, max_boxes: int) -> tuple[Image.Image, list[list[float]]]:
    """image_annotator value -> (upright RGB image, validated boxes in its pixels)."""
    if not value or value.get("image") is None:
        raise gr.Error("No image: upload an image first.")
    image = value["image"]
    # The annotator can rotate the image in the browser (quarter turns clockwise); its boxes are in that frame.
    if value.get("orientation"):
        image = image.rotate(-90 * value["orientation"], expand=True)
    image = check_image(image)
    boxes = [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in value.get("boxes") or []]
    if not boxes:
        raise gr.Error("No box: drag on the image to draw a box.")
    if len(boxes) > max_boxes:
        raise gr.Error(f"{len(boxes)} boxes drawn; the limit is {max_boxes}. Remove some.")
    for i, box in enumerate(boxes, 1):
        try:
            processor.validate_box(box, image.size)
        except ValueError as err:
            raise gr.Error(f"Box {i} is invalid: {err}") from None
    return image, [[float(v) for v in box] for box in boxes]


def heatmap_overlay(image: Image.Image, sim: np.ndarray, box: list[float]) -> Image.Image:
    """Similarity -> blue (map minimum) .. yellow .. red (map maximum), blended over the image, box outlined.

    The colours span this map's own range: ViT patch features share a large common component, so raw cosines of
    one image often sit within a narrow band (e.g. 0.9 .. 1.0) that a fixed [-1, 1] scale would paint one colour.
    """
    low, high = float(sim.min()), float(sim.max())
    scaled = (sim - low) / max(high - low, 1e-6)
    gray = Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L")
    colored = ImageOps.colorize(gray, black="#2040ff", mid="#ffe040", white="#ff2020")
    overlay = Image.blend(image, colored, alpha=0.55)
    ImageDraw.Draw(overlay).rectangle(box, outline="#ffffff", width=max(2, round(max(image.size) / 200)))
    return overlay


def pixel_box(box: list[float]) -> tuple[int, int, int, int]:
    return tuple(round(v) for v in box)


# ---- UI ----------------------------------------------------------------------------------------------------------
def build_demo(demo_model: GranViTDemo, untrained: bool = False, examples: list[dict] | None = None) -> gr.Blocks:
    """The four tabs; ``examples`` (``find_examples``) become clickable examples of Describe regions and Find."""
    use_atomic_image_cache()
    processor = demo_model.processor
    examples = examples or []

    def require(task):
        note = demo_model.untrained_note(task)
        if note:
            raise gr.Error(note)

    def notice(task, elem_id):
        """The tab's note when the checkpoint never learned its task; the tab's button is then disabled."""
        note = demo_model.untrained_note(task)
        if note:
            gr.Markdown(f"**{note}**", elem_id=elem_id)
        return note is None

    def describe_regions(value):
        require("bbox2caption")
        image, boxes = read_annotation(value, processor, MAX_BOXES)
        captions = demo_model.describe(image, boxes)
        annotations = [(pixel_box(b), f"{i}: {c}") for i, (b, c) in enumerate(zip(boxes, captions), 1)]
        return (image, annotations), [{"box": b, "caption": c} for b, c in zip(boxes, captions)]

    def find(image, phrase, threshold=FIND_THRESHOLD):
        require("caption2bbox")
        image, phrase = check_image(image), check_text(phrase, "phrase")
        found = demo_model.find(image, phrase, threshold)
        boxes, scores = found["boxes"], found["scores"]
        flat = [i for i, (x1, y1, x2, y2) in enumerate(boxes, 1) if x2 <= x1 or y2 <= y1]
        if flat:
            gr.Warning(f"Predicted box(es) {flat} have zero width or height (both corners in one coordinate bin).")
        annotations = [(pixel_box(b), f"{i}: {phrase} ({s:.2f})") for i, (b, s) in enumerate(zip(boxes, scores), 1)]
        if boxes:
            answer = f"**Found** {len(boxes)} box(es), score " + ", ".join(f"{s:.2f}" for s in scores) + "."
        else:
            answer = f"**Not found**: no region matches \"{phrase}\" (score threshold {threshold:.2f})."
        return (image, annotations), {"phrase": phrase, "boxes": boxes, "scores": scores, "found": bool(boxes)}, answer

    def ask(image, question):
        require("vqa")
        image, question = check_image(image), check_text(question, "question")
        return demo_model.ask(image, question)

    def region_similarity(value):
        image, [box] = read_annotation(value, processor, 1)
        sim = demo_model.similarity(image, box)
        x1, y1, x2, y2 = pixel_box(box)
        inside = np.zeros(sim.shape, dtype=bool)
        inside[y1:y2, x1:x2] = True
        stats = {
            "box": box,
            "min": float(sim.min()),
            "max": float(sim.max()),
            "mean_inside": float(sim[inside].mean()),
            "mean_outside": float(sim[~inside].mean()) if (~inside).any() else None,
        }
        return heatmap_overlay(image, sim, box), stats

    with gr.Blocks(title="GranViT region demo") as demo:
        gr.Markdown(
            "# GranViT: fine-grained, region-aware vision features\n"
            f"Model: `{demo_model.model_id}` on {demo_model.device}. Boxes are `[x1, y1, x2, y2]` in image pixels."
        )
        if untrained:
            gr.Markdown(
                "**UNTRAINED model**: the default checkpoint was not found, so this is a randomly initialized tiny "
                "GranViT built on launch. The UI works; captions, boxes and answers are noise. Pass `--model` or set "
                "`GRANVIT_MODEL` to a trained checkpoint.",
                elem_id="untrained_banner",
            )
        # Examples sit under their inputs, so the outputs they fill are made first and placed later (render=False).
        with gr.Tab("Describe regions"):
            describe_on = notice("bbox2caption", "describe_untrained")
            gr.Markdown(f"Upload an image and drag to draw up to {MAX_BOXES} boxes; each gets a caption.")
            describe_img = gr.AnnotatedImage(label="Captions", height=420, elem_id="describe_img", render=False)
            describe_json = gr.JSON(label="Boxes and captions", elem_id="describe_json", render=False)
            with gr.Row():
                with gr.Column():
                    describe_in = image_annotator(
                        image_type="pil", disable_edit_boxes=True, label="Image and boxes", elem_id="describe_in"
                    )
                    if examples and describe_on:
                        gr.Examples(
                            [[annotator_value(e)] for e in examples], describe_in, [describe_img, describe_json],
                            describe_regions, run_on_click=True, cache_examples=False, api_name="describe_example",
                            label="Held-out images with their true boxes (labels: true captions): click one",
                            elem_id="describe_examples",
                        )
                with gr.Column():
                    describe_img.render()
                    describe_json.render()
            describe_btn = gr.Button(
                "Describe regions", variant="primary", elem_id="describe_btn", interactive=describe_on
            )
            describe_btn.click(
                describe_regions, describe_in, [describe_img, describe_json], api_name="describe_regions"
            )
        with gr.Tab("Find"):
            find_on = notice("caption2bbox", "find_untrained")
            find_img = gr.AnnotatedImage(label="Predicted boxes (score)", height=420, elem_id="find_img", render=False)
            find_json = gr.JSON(label="Boxes and scores", elem_id="find_json", render=False)
            find_answer = gr.Markdown(elem_id="find_answer", render=False)
            with gr.Row():
                with gr.Column():
                    find_img_in = gr.Image(type="pil", label="Image", elem_id="find_in")
                    find_text = gr.Textbox(label="Phrase", placeholder="the red car on the left", elem_id="find_text")
                    find_threshold = gr.Slider(
                        0, 1, value=FIND_THRESHOLD, step=0.01, elem_id="find_threshold",
                        label="Score threshold: boxes scoring below it are dropped (none left: not found)",
                    )
                    find_btn = gr.Button("Find", variant="primary", elem_id="find_btn", interactive=find_on)
                    if examples and find_on:
                        gr.Examples(
                            [[e["image"], e["regions"][0]["caption"]] for e in examples], [find_img_in, find_text],
                            [find_img, find_json, find_answer], find, run_on_click=True, cache_examples=False,
                            api_name="find_example", label="Held-out images with a true phrase: click one",
                            elem_id="find_examples",
                        )
                with gr.Column():
                    find_answer.render()
                    find_img.render()
                    find_json.render()
            gr.on(
                [find_btn.click, find_text.submit], find, [find_img_in, find_text, find_threshold],
                [find_img, find_json, find_answer], api_name="find",
            )
        with gr.Tab("Ask"):
            ask_on = notice("vqa", "ask_untrained")
            with gr.Row():
                with gr.Column():
                    ask_img = gr.Image(type="pil", label="Image", elem_id="ask_in")
                    ask_text = gr.Textbox(label="Question", placeholder="What colour is the car?", elem_id="ask_text")
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask_btn", interactive=ask_on)
                ask_out = gr.Textbox(label="Answer", elem_id="ask_out")
            gr.on([ask_btn.click, ask_text.submit], ask, [ask_img, ask_text], ask_out, api_name="ask")
        with gr.Tab("Region similarity"):
            gr.Markdown(
                "Draw one box: the heatmap is the cosine similarity between the box's region feature (ROIAlign over "
                "the ViT patch grid) and every patch feature. Colours span this map's range: red = its maximum, "
                "blue = its minimum (the JSON gives the values)."
            )
            with gr.Row():
                sim_in = image_annotator(
                    image_type="pil", single_box=True, disable_edit_boxes=True, label="Image and box", elem_id="sim_in"
                )
                with gr.Column():
                    sim_img = gr.Image(type="pil", label="Similarity heatmap", height=420, elem_id="sim_img")
                    sim_json = gr.JSON(label="Mean similarity inside / outside the box", elem_id="sim_json")
            sim_btn = gr.Button("Show similarity", variant="primary", elem_id="sim_btn")
            sim_btn.click(region_similarity, sim_in, [sim_img, sim_json], api_name="region_similarity")
    return demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)


@console_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"Hub id or checkpoint folder (default: $GRANVIT_MODEL, else {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    model_id, untrained = resolve_model(args.model)
    model_id = check_model_source(model_id, "--model" if args.model else "GRANVIT_MODEL")
    demo = build_demo(GranViTDemo(model_id), untrained=untrained, examples=find_examples(model_id))
    demo.launch(
        server_name=os.environ.get("HOST", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")),
        server_port=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", "7860"))),
        max_file_size="25mb",
        show_error=True,
    )


if __name__ == "__main__":
    sys.exit(main())
