"""One box rule, three callers: the processor raises, the data layer counts a reason, the metrics score a miss."""

import io

import pytest
from PIL import Image

from granvit import box_utils_granvit as B
from granvit.eval import metrics as M
from granvit.eval.benchmarks import to_pil
from granvit.processing_granvit import GranViTProcessor
from granvit.train.data import schema

SIZE = (100, 50)

# box, the rule it breaks inside a 100 x 50 image (None: valid), whether it is a valid box without an image
CASES = [
    ([0, 0, 100, 50], None, True),
    ([10.5, 2, 11, 3], None, True),
    ([float("nan"), 0, 10, 10], "finite", False),
    ([0, 0, float("inf"), 10], "finite", False),
    ([-1, 0, 10, 10], "non-negative", True),
    ([0, 0, 101, 10], "inside image", True),
    ([0, 0, 10, 60], "inside image", True),
    ([20, 0, 10, 10], "x1 <= x2 and y1 <= y2", False),
    ([5, 5, 5, 10], "positive area", False),
    ([1, 2, 3], "length", False),
    (["a", 0, 1, 1], "numeric", False),
    (["1", 0, 1, 1], "numeric", False),  # float("1") works, but a string is not a coordinate
    ([True, 0, 1, 1], "numeric", False),
    ("1234", "numeric", False),
    (None, "numeric", False),
]


@pytest.mark.parametrize("box,rule,valid_without_image", CASES)
def test_every_caller_applies_the_same_rule(box, rule, valid_without_image):
    problem = B.box_problem(box, SIZE)
    assert (problem and problem[0]) == rule
    if rule is None:
        assert GranViTProcessor.validate_box(box, SIZE) == [float(v) for v in box]
        assert schema.box_reason(box, *SIZE) is None
    else:
        with pytest.raises(ValueError, match=f"Box .*rule: {rule}"):
            GranViTProcessor.validate_box(box, SIZE)
        assert schema.box_reason(box, *SIZE) == B.BOX_RULES[rule]
    assert M.valid_box(box) is valid_without_image
    assert set(B.BOX_RULES.values()) <= set(schema.REASONS)


def test_an_invalid_prediction_is_a_miss_and_iou_is_hand_computed():
    scores = M.grounding_scores([[0, 0, 10, 10], [5, 5, 1, 1], None], [[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 5, 5]])
    assert scores["acc@0.5"] == pytest.approx(1 / 3) and scores["invalid"] == 2
    assert B.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert B.xywh_to_xyxy([10, 20, 30, 40]) == [10.0, 20.0, 40.0, 60.0]


def _exif_rotated_png_cell():
    image = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent: white once converted like the model
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: upright it is 20 x 40
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    return {"bytes": buffer.getvalue(), "path": None}


def test_image_cells_decode_upright_and_rgb_like_the_model(tmp_path):
    cell = _exif_rotated_png_cell()
    assert schema.decode_image(cell).size == (20, 40)
    for image in (to_pil(cell), schema.decode_image(cell, rgb=True)):
        assert image.mode == "RGB" and image.size == (20, 40) and image.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "a.png").write_bytes(cell["bytes"])
    assert to_pil("a.png", str(tmp_path)).size == (20, 40)
    assert to_pil({"bytes": None, "path": "a.png"}, str(tmp_path)).size == (20, 40)
    assert to_pil([cell, cell]).size == (40, 40)  # several images are tiled side by side
    with pytest.raises(schema.BadRecord, match="missing_image"):
        to_pil("nowhere.png", str(tmp_path))
