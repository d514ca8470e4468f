"""``pipeline("granvit-regions")``: describe and ground many regions of an image through transformers' pipeline API.

    from transformers import pipeline
    regions = pipeline("granvit-regions", model="org/granvit", trust_remote_code=True)
    regions(image, boxes=[[10, 20, 200, 180], [220, 40, 400, 300]])
    # [{"box": [10, 20, 200, 180], "caption": "a red car"}, {"box": [220, 40, 400, 300], "caption": "..."}]
    regions(image, phrases=["the red car", "a man on the left"])
    # [{"phrase": "the red car", "boxes": [[x1, y1, x2, y2]], "scores": [0.87]}, ...]
    regions(image, phrases=["a dog"], threshold=0.5)     # boxes scoring below 0.5 dropped: [] means "not found"
    regions([{"image": a, "boxes": [...]}, {"image": b, "phrases": [...]}])   # a list of images: a list of answers

Images are PIL images, paths or URLs; boxes are ``[x1, y1, x2, y2]`` in pixels of the (EXIF-upright) image. The
answers come from the model's dense region APIs, ``describe_regions`` and ``ground`` (region_decoding_granvit.py:
one image encode, one shared prefill, one decode batch per kind of query; grounding under the box grammar, so every
answer holds a box, or is "not found" for a checkpoint trained with negatives). Each box has a score in [0, 1]
(grounding_granvit.py); ``threshold`` keeps the boxes scoring at least that, so a phrase can come back with none. A
checkpoint names this class in ``config.custom_pipelines`` and ships this file: ``granvit-build``'s ``save_granvit`` and
the stage Trainers' checkpoints copy it (transformers' ``custom_object_save``, as ``Pipeline.save_pretrained`` does for
a registered pipeline; ``model.save_pretrained`` alone copies only the modeling file and the files it imports). With the
granvit package imported, ``pipeline("granvit-regions", model=model, processor=processor)`` also works on objects in
memory.
"""

from transformers import Pipeline
from transformers.image_utils import load_image


class GranViTRegionsPipeline(Pipeline):
    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def _sanitize_parameters(self, boxes=None, phrases=None, max_new_tokens=None, timeout=None, threshold=None,
                             **kwargs):
        if kwargs:
            raise TypeError(
                f"granvit-regions got unexpected argument(s) {sorted(kwargs)}; it takes boxes, phrases, "
                "max_new_tokens, threshold and timeout"
            )
        preprocess = {"boxes": boxes, "phrases": phrases, "timeout": timeout}
        forward = {k: v for k, v in {"max_new_tokens": max_new_tokens, "threshold": threshold}.items() if v is not None}
        return {k: v for k, v in preprocess.items() if v is not None}, forward, {}

    def preprocess(self, inputs, boxes=None, phrases=None, timeout=None) -> dict:
        if isinstance(inputs, dict):
            image, boxes, phrases = inputs["image"], inputs.get("boxes", boxes), inputs.get("phrases", phrases)
        else:
            image = inputs
        if boxes is None and phrases is None:
            raise ValueError("granvit-regions needs boxes=[[x1, y1, x2, y2], ...] to describe, phrases=[...] to ground, "
                             "or both")
        if isinstance(image, str):  # a path or URL; PIL images go to the processor as they are
            image = load_image(image, timeout=timeout)
        return {"image": image, "boxes": boxes, "phrases": phrases}

    def _forward(self, model_inputs: dict, max_new_tokens: int | None = None, threshold: float | None = None) -> dict:
        image, boxes, phrases = model_inputs["image"], model_inputs["boxes"], model_inputs["phrases"]
        outputs = dict(model_inputs)
        if boxes is not None:
            budget = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
            outputs["captions"] = self.model.describe_regions(self.processor, image, boxes, **budget)
        if phrases is not None:
            outputs["grounded"] = self.model.ground(self.processor, image, phrases, max_new_tokens=max_new_tokens,
                                                    return_scores=True, threshold=threshold)
        return outputs

    def postprocess(self, model_outputs: dict) -> list[dict]:
        answers = [{"box": [float(v) for v in box], "caption": caption}
                   for box, caption in zip(model_outputs["boxes"] or [], model_outputs.get("captions", []))]
        answers += [{"phrase": phrase, **grounded}
                    for phrase, grounded in zip(model_outputs["phrases"] or [], model_outputs.get("grounded", []))]
        return answers


__all__ = ["GranViTRegionsPipeline"]
