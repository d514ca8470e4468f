"""Evaluation decodes the way users decode: grounding scores come from `model.ground`'s box grammar inside batched
`generate` (token-identical answers), the unconstrained answers are scored beside them; remote code is opt-in."""

import json
import shutil

import pytest
from datasets import Dataset

from granvit.console import UserError
from granvit.eval import metrics as M
from granvit.eval import run as R
from granvit.eval.benchmarks import to_pil


@pytest.fixture(scope="module")
def test_split():
    from granvit.train.data.schema import GRAN_FEATURES
    from granvit.train.data.synth import SynthConfig, generate_record

    cfg = SynthConfig(image_size=64, min_objects=1, max_objects=2, ocr_fraction=0)
    return Dataset.from_list([generate_record(cfg, 0, "test", i) for i in range(3)], features=GRAN_FEATURES)


def test_constrained_grounding_equals_model_ground(tiny_model_and_processor, test_split):
    model, processor = tiny_model_and_processor
    out = R.evaluate_synthetic(model, processor, test_split, batch_size=3, baselines=False, limit=5)
    regions = [(to_pil(row["image"]), region) for row in test_split for region in row["regions"]][:5]
    # The reference: the user's API, one phrase at a time (dense decoding), its first box.
    expected = [model.ground(processor, image, [region["caption"]], max_new_tokens=processor.max_box_tokens + 1)[0][0]
                for image, region in regions]
    assert [e["predicted_box"] for e in out["examples"]] == expected
    assert len({tuple(b) for b in expected}) > 1  # not one constant box: the images matter
    truth = [[float(v) for v in region["bbox"]] for _, region in regions]
    assert out["grounding_miou"] == sum(M.box_iou(p, t) for p, t in zip(expected, truth)) / len(truth)
    assert out["grounding_invalid"] == 0
    # Unconstrained answers are scored beside them; the untrained model writes no box on its own.
    assert [e["predicted_box_unconstrained"] for e in out["examples"]] == [None] * len(regions)
    assert (out["grounding_invalid_unconstrained"], out["grounding_acc50_unconstrained"]) == (len(regions), 0.0)
    assert "grounding_acc50_baseline" not in out


def test_validation_can_skip_the_unconstrained_pass(tiny_model_and_processor, test_split):
    model, processor = tiny_model_and_processor
    out = R.evaluate_synthetic(model, processor, test_split, batch_size=3, baselines=False, unconstrained=False)
    assert not any(key.endswith("_unconstrained") for key in out)


def test_benchmark_records_carry_both_decodings(tiny_model_and_processor, tmp_path):
    from PIL import Image

    model, processor = tiny_model_and_processor
    Image.new("RGB", (48, 40), "red").save(tmp_path / "0.png")
    rows = [{"question_id": 0, "image": "0.png", "answer": ["the red thing"], "bbox": [2, 3, 20, 15]}]
    (tmp_path / "refcoco.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = R.run_benchmark(model, processor, "refcoco_val", str(tmp_path / "out"), data=str(tmp_path / "refcoco.jsonl"))
    [record] = R.read_predictions(str(tmp_path / "out" / "refcoco_val" / "predictions.jsonl"))
    image = Image.open(tmp_path / "0.png").convert("RGB")
    assert record["box"] == model.ground(processor, image, ["the red thing"], max_new_tokens=processor.max_box_tokens + 1)[0][0]
    assert record["text_unconstrained"] is not None and scores["invalid"] == 0
    assert scores["invalid_unconstrained"] == (record["box_unconstrained"] is None)


def test_remote_code_is_opt_in(tiny_checkpoint, tmp_path):
    model, _ = R.load_model(str(tiny_checkpoint), "cpu", "float32")
    assert type(model).__module__ == "granvit.modeling_granvit"  # the installed package, no code from the folder
    fork = tmp_path / "fork"
    shutil.copytree(tiny_checkpoint, fork)
    config = json.loads((fork / "config.json").read_text())
    (fork / "config.json").write_text(json.dumps({**config, "model_type": "granvit_fork"}))
    with pytest.raises(UserError, match="pass --trust-remote-code if you trust that repository"):
        R.load_model(str(fork), "cpu", "float32")
    model, _ = R.load_model(str(fork), "cpu", "float32", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")


def test_lmms_adapter_takes_trust_remote_code_as_text(tiny_checkpoint):
    pytest.importorskip("lmms_eval")
    from granvit.eval.lmms_eval_granvit import GranViTLmms

    assert type(GranViTLmms(str(tiny_checkpoint), device="cpu", trust_remote_code="False").model).__module__ == (
        "granvit.modeling_granvit")
    with pytest.raises(ValueError, match="expected true or false"):
        GranViTLmms(str(tiny_checkpoint), device="cpu", trust_remote_code="maybe")


def test_gran_data_is_checked_before_the_model_loads(tmp_path):
    from granvit.train.data.synth import SynthConfig, write_synth

    with pytest.raises(UserError, match="--benchmark gran needs --data"):
        R.check_gran_data(None, "test")
    with pytest.raises(UserError, match="no such folder or file"):
        R.check_gran_data(str(tmp_path / "nope"), "test")
    write_synth(str(tmp_path / "gran"), {"train": 2}, SynthConfig(image_size=64, min_objects=1, max_objects=1, ocr_fraction=0))
    with pytest.raises(UserError, match=r"has no 'test' split \(it has train\); pass --split"):
        R.check_gran_data(str(tmp_path / "gran"), "test")
    assert R.check_gran_data(str(tmp_path / "gran"), "train") == ["train"]
