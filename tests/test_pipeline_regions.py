"""pipeline("granvit-regions"): the model's dense region APIs behind transformers' pipeline interface (the fresh-process
load from a checkpoint with trust_remote_code is in test_hub_loading.py)."""

import pytest
from PIL import Image
from transformers import pipeline

from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # every test here, once per box format

BOXES = [[1, 2, 30, 40], [10, 10, 70, 47]]
PHRASES = ["red", "a red square near the top left corner"]


@pytest.fixture(scope="module")
def regions(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    return pipeline("granvit-regions", model=model, processor=processor, device="cpu")


def _scene():
    image = Image.new("RGB", (80, 48), "white")
    image.paste(Image.new("RGB", (20, 20), "red"), (10, 10))
    return image


def test_answers_are_the_models_dense_apis(regions, tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    image = _scene()
    captions = model.describe_regions(processor, image, BOXES, max_new_tokens=8)
    grounded = model.ground(processor, image, PHRASES, max_new_tokens=8, return_scores=True)
    expected = [{"box": [float(v) for v in b], "caption": c} for b, c in zip(BOXES, captions)]
    expected += [{"phrase": p, "boxes": g["boxes"], "scores": g["scores"]} for p, g in zip(PHRASES, grounded)]
    assert regions(image, boxes=BOXES, phrases=PHRASES, max_new_tokens=8) == expected
    image.save(tmp_path / "scene.png")
    assert regions(str(tmp_path / "scene.png"), boxes=BOXES, phrases=PHRASES, max_new_tokens=8) == expected
    # A list of images gives a list of answers; each item may carry its own queries.
    both = regions([{"image": image, "boxes": BOXES}, {"image": image, "phrases": PHRASES}], max_new_tokens=8)
    assert both == [expected[: len(BOXES)], expected[len(BOXES) :]]


def test_grounding_always_gives_a_box_with_default_budgets(regions):
    out = regions(_scene(), phrases=PHRASES)
    assert [len(answer["boxes"]) >= 1 for answer in out] == [True, True]
    assert all(len(a["scores"]) == len(a["boxes"]) and all(0 < s <= 1 for s in a["scores"]) for a in out)


def test_threshold_drops_low_scoring_boxes(regions):
    scores = [s for answer in regions(_scene(), phrases=PHRASES) for s in answer["scores"]]
    cut = sorted(scores)[0] + 1e-9  # just above the lowest score: that box goes, the others stay
    kept = regions(_scene(), phrases=PHRASES, threshold=cut)
    assert [s for answer in kept for s in answer["scores"]] == [s for s in scores if s >= cut]
    assert all(answer["boxes"] == [] and answer["scores"] == [] for answer in regions(_scene(), phrases=PHRASES,
                                                                                        threshold=1.01))


def test_bad_calls_are_clear_errors(regions):
    with pytest.raises(TypeError, match="unexpected argument.*temperature"):
        regions(_scene(), boxes=BOXES, temperature=0.7)
    with pytest.raises(ValueError, match="needs boxes"):
        regions(_scene())
    with pytest.raises(ValueError, match="rule: inside image"):
        regions(_scene(), boxes=[[0, 0, 500, 10]])
