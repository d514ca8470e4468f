"""experiments/grounding_scores.py: the measurement of box scores and "not found" (threshold choice and summary on
known records; the whole script on two tiny checkpoints in seconds; the training arms at smoke scale, slow)."""

import json

import pytest

from granvit.experiments import grounding_scores as G
from granvit.grounding_granvit import NEGATIVE_TASK


def record(present, scores, iou=0.0):
    return {"present": present, "boxes": [[0, 0, 1, 1]] * len(scores), "scores": scores, "iou": iou}


RECORDS = [record(True, [0.9], 0.8), record(True, [0.7], 0.6), record(True, [0.4], 0.1), record(True, [], 0.0),
           record(False, [0.5]), record(False, [0.2]), record(False, [])]


def test_threshold_and_summary_on_known_records():
    # refusals (absent, present) and J: t=0 (1/3, 1/4) 0.08; 0.4 (2/3, 1/4) 0.42; 0.5 (2/3, 2/4) 0.17;
    # 0.7 (3/3, 2/4) 0.5; 0.9 (3/3, 3/4) 0.25
    threshold = G.choose_threshold(RECORDS)
    assert threshold == 0.7
    assert G.choose_threshold(RECORDS[:4]) == 0.0  # no absent phrase: nothing to choose by
    out = G.summarize(RECORDS, threshold)
    assert out["present_phrases"] == 4 and out["absent_phrases"] == 3
    assert out["grounding_acc50"] == 0.5  # 0.8 and 0.6 of four
    assert out["score_auroc"] == 1.0  # the right boxes (0.9, 0.7) outscore the wrong one (0.4)
    assert out["not_found_absent"] == 1.0 and out["not_found_present"] == 0.5
    assert out["model_not_found_absent"] == pytest.approx(1 / 3) and out["model_not_found_present"] == 0.25
    assert out["grounding_acc50_at_threshold"] == 0.5
    # present vs absent: scores 0.9 0.7 0.4 0 vs 0.5 0.2 0 -> 8.5 of 12 pairs
    assert out["present_vs_absent_auroc"] == pytest.approx(8.5 / 12)


def test_the_with_arm_adds_negatives_where_caption2bbox_trains(tmp_path):
    without = G.arm_recipe(str(G.CONFIG), "without", tmp_path, tmp_path / "data", 0.2, [])
    with_ = G.arm_recipe(str(G.CONFIG), "with", tmp_path, tmp_path / "data", 0.2, [])
    assert without["phases"]["stage2"]["tasks"] == {"caption2bbox": 1.0, "bbox2caption": 1.0}
    assert with_["phases"]["stage2"]["tasks"] == {"caption2bbox": 1.0, "bbox2caption": 1.0, NEGATIVE_TASK: 0.2}
    assert with_["phases"]["stage1"]["tasks"] == without["phases"]["stage1"]["tasks"] == {"bbox2caption": 1.0}
    assert with_["data"]["path"] == str(tmp_path / "data") and with_["output_dir"] == str(tmp_path / "with")


@pytest.fixture(scope="module")
def gran_dir(tmp_path_factory):
    from granvit.train.data.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("gran-scores")
    write_synth(str(out), {"train": 6, "val": 2, "test": 3}, SynthConfig(image_size=64, min_objects=1, max_objects=2,
                                                                           ocr_fraction=0.0), seed=0)
    return out


def test_the_script_on_two_checkpoints(tmp_path, tiny_checkpoint, gran_dir):
    from conftest import load_tiny
    from granvit.train.build import save_granvit

    model, processor = load_tiny(tiny_checkpoint)
    model.config.trained_tasks = ["bbox2caption", "caption2bbox", NEGATIVE_TASK]
    negatives = save_granvit(model, processor, tmp_path / "negatives")
    result = G.main(["--without", str(tiny_checkpoint), "--with", str(negatives), "--data", str(gran_dir),
                     "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "grounding_scores.json").read_text()) == json.loads(json.dumps(result))
    for arm in G.ARMS:
        test = result["arms"][arm]["test"]
        assert test["absent_phrases"] == 3 and test["present_phrases"] >= 3  # one absent phrase per test image
        assert 0 <= test["grounding_acc50"] <= 1 and 0 <= test["not_found_absent"] <= 1
        assert result["arms"][arm]["val"]["threshold"] == test["threshold"]  # chosen on val, applied on test
    assert result["arms"]["without"]["test"]["model_not_found_absent"] == 0.0  # the paper's grammar: always a box
    assert NEGATIVE_TASK in result["arms"]["with"]["trained_tasks"]
    assert result["acc50_change"] == pytest.approx(result["arms"]["with"]["test"]["grounding_acc50"]
                                                   - result["arms"]["without"]["test"]["grounding_acc50"])


@pytest.mark.slow
def test_smoke_trains_both_arms(tmp_path):
    result = G.main(["--smoke", "--out", str(tmp_path)])
    assert result["arms"]["with"]["phases"]["stage2"][NEGATIVE_TASK] == 0.2
    assert NEGATIVE_TASK in result["arms"]["with"]["trained_tasks"]
    assert NEGATIVE_TASK not in result["arms"]["without"]["trained_tasks"]
    assert result["arms"]["with"]["test"]["absent_phrases"] > 0
