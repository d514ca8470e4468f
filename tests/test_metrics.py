"""Metrics against hand-computed cases (eval/metrics.py) and one local `evaluate` module."""
import math
import shutil
from pathlib import Path

import pytest

from granvit.eval import metrics as M

METRICS_DIR = Path(__file__).resolve().parents[1] / "eval" / "evaluate_metrics"


# ----------------------------------------------------------------------------- boxes

def test_box_iou_hand_computed():
    # Overlap 5x10 = 50, union 100 + 100 - 50 = 150.
    assert M.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert M.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0


@pytest.mark.parametrize("box", [None, [], [1, 2, 3], [10, 10, 0, 0], [0, 0, 0, 5], [0, 0, math.nan, 5],
                                 [0, 0, math.inf, 5], ["a", 0, 1, 1]])
def test_invalid_boxes_are_recognised(box):
    assert not M.valid_box(box)


def test_grounding_scores_counts_misses():
    ref = [0, 0, 10, 10]
    preds = [[0, 0, 10, 10], [5, 0, 15, 10], None, [10, 10, 0, 0], []]
    out = M.grounding_scores(preds, [ref] * 5)
    # IoUs: 1, 1/3, 0 (missing), 0 (inverted), 0 (empty).
    assert out["acc@0.5"] == pytest.approx(1 / 5)
    assert out["miou"] == pytest.approx((1 + 1 / 3) / 5)
    assert out["invalid"] == 3 and out["count"] == 5


def test_grounding_sweep():
    # IoU 0.8 passes the thresholds 0.50 .. 0.80 (7 of 10); IoU 1 passes all 10.
    out = M.grounding_scores([[0, 0, 10, 8], [0, 0, 10, 10]], [[0, 0, 10, 10]] * 2, thresholds=(0.5, 0.75, 0.9))
    assert out["acc@0.5:0.95"] == pytest.approx((0.7 + 1.0) / 2)
    assert out["acc@0.75"] == 1.0 and out["acc@0.9"] == 0.5


def test_grounding_bad_reference_names_sample():
    with pytest.raises(ValueError, match="sample 1"):
        M.grounding_scores([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1], [5, 5, 1, 1]])


# ----------------------------------------------------------------------------- text

def test_exact_match_normalises():
    assert M.exact_match(["A red car.", "blue"], ["a red  car", "a blue"]) == 0.5


def test_caption_scores_hand_computed():
    # One sample, pred "a b c d" vs ref "a b x d": LCS 3 -> P = R = 3/4, ROUGE-L F(beta=1.2) = 3/4.
    # BLEU-1 = 3/4 (equal lengths, no brevity penalty).
    out = M.caption_scores(["a b c d"], ["a b x d"], meteor=False)
    assert out["rougeL"] == pytest.approx(0.75)
    assert out["bleu1"] == pytest.approx(0.75, abs=1e-6)
    assert "meteor" not in out and out["meteor_skipped"]


def test_caption_scores_rank_right_above_wrong():
    refs = [["a man riding a red horse"], ["two cats sleeping on a sofa"], ["a plate of green salad"]]
    right = M.caption_scores(["a man riding a red horse", "two cats sleeping on a sofa", "a plate of green salad"],
                             refs, meteor=False)
    wrong = M.caption_scores(["a plate of salad", "a man on a horse", "", ], refs, meteor=False)
    assert right["bleu4"] == pytest.approx(1.0, abs=1e-6) and right["rougeL"] == pytest.approx(1.0)
    assert right["cider"] > wrong["cider"] and wrong["bleu4"] < 0.1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_with_java():
    out = M.caption_scores(["a red car"], ["a red car"], meteor=True)
    assert out["meteor"] == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("raw,norm", [
    ("The two dogs.", "2 dogs"),      # article, number word, final period
    ("yes/no", "yes no"),             # punctuation between words -> space
    ("1,000 cars", "1000 cars"),      # a digit comma makes every mark vanish
    ("dont", "don't"),                # contraction table
    ("2.5", "2.5"),                   # a period before a digit stays
    ("  Ten\n", "10"),
])
def test_vqa_normalize(raw, norm):
    assert M.vqa_normalize(raw) == norm


@pytest.mark.parametrize("matches,expected", [
    (0, 0.0),
    (1, 0.3),                         # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),                         # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),                         # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert M.vqa_accuracy("2.", answers) == pytest.approx(expected)


# ----------------------------------------------------------------------------- OCR

def test_anls():
    assert M.anls("hallo", ["hello"]) == pytest.approx(0.8)        # 1 edit / 5 chars
    assert M.anls(" Hello ", ["hello"]) == 1.0
    assert M.anls("abxy", ["abcd"]) == 0.0                          # NL = 0.5 is not < 0.5
    assert M.anls("abcx", ["zzzz", "abcd"]) == pytest.approx(0.75)  # best answer wins
    assert M.anls("", ["abc"]) == 0.0


@pytest.mark.parametrize("pred,target,score", [
    ("10.4", "10", 1.0),      # 4% off
    ("10.6", "10", 0.0),      # 6% off
    ("45%", "0.45", 1.0),     # percent sign reads as /100
    ("0", "0", 1.0),          # zero target: exact match only
    ("0.01", "0", 0.0),
    ("Yes", "yes", 1.0),
    ("yes ", "no", 0.0),
])
def test_relaxed_accuracy(pred, target, score):
    assert M.relaxed_accuracy(pred, [target]) == score


def test_ocrbench_score():
    assert M.ocrbench_score("The sign says HELLO world", ["hello"]) == 1.0
    assert M.ocrbench_score("goodbye", ["hello", "bye"]) == 1.0
    assert M.ocrbench_score("hell", ["hello"]) == 0.0
    assert M.ocrbench_score("x ^ 2 + 1", ["x^2+1"], dataset_name="HME100k") == 1.0
    assert M.ocrbench_score("X^2", ["x^2"], dataset_name="HME100k") == 0.0


# ----------------------------------------------------------------------------- choice, yes/no

OPTS = {"A": "red", "B": "blue", "C": "green", "D": "light blue"}


@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("(C) green", "C"), ("The answer is A.", "A"), ("C.", "C"),
    ("I think it is green", "C"), ("A or B", None), ("no idea", None),
    ("blue", "B"),
    ("light blue", None),     # both "blue" and "light blue" appear: ambiguous, as in VLMEvalKit
])
def test_extract_choice(pred, letter):
    assert M.extract_choice(pred, OPTS) == letter


def test_choice_accuracy_counts_unparsed():
    out = M.choice_accuracy(["A", "x", "C"], [OPTS] * 3, ["A", "B", "D"])
    assert out["accuracy"] == pytest.approx(1 / 3) and out["unparsed"] == 1


def test_group_accuracy_circular():
    # Question 1 right in every rotation, question 2 wrong once -> circular accuracy 1/2.
    assert M.group_accuracy([1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 1]) == 0.5


def test_yes_no_accuracy():
    out = M.yes_no_accuracy(["Yes, it is.", "No.", "maybe yes maybe no", "no"], ["1", "0", "yes", "yes"])
    assert out["correct"] == [True, True, False, False]
    assert out["accuracy"] == 0.5 and out["unparsed"] == 1


# ----------------------------------------------------------------------------- evaluate modules

def test_local_evaluate_module(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))   # evaluate caches modules under $HF_HOME
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import evaluate

    metric = evaluate.load(str(METRICS_DIR / "granvit_region_iou"))
    out = metric.compute(predictions=[[0, 0, 10, 10], []], references=[[0, 0, 10, 10], [0, 0, 5, 5]])
    assert out["acc@0.5"] == 0.5 and out["invalid"] == 1


def test_local_caption_module(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import evaluate

    metric = evaluate.load(str(METRICS_DIR / "granvit_caption"))
    out = metric.compute(predictions=["a b c d", "red car"], references=[["a b x d"], ["a red car", "red car"]],
                         meteor=False)
    assert out["exact"] == 0.5 and out["count"] == 2 and 0 < out["rougeL"] < 1
