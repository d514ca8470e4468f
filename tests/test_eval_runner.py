"""granvit-eval on a tiny untrained checkpoint and tiny local files: every task type, resume, synthetic eval."""
import json

import pytest
from PIL import Image

from granvit.eval import run as R
from granvit.eval.report import update_scores


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(d / f"{i}.png")

    def write(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("refcoco.jsonl", [{"question_id": i, "image": f"{i}.png", "answer": [f"the {c} thing", "it"],
                             "bbox": [2, 3, 20, 15]} for i, c in enumerate(["red", "blue", "green"])])
    write("refcap.jsonl", [{"question_id": i, "image": f"{i}.png", "answer": ["a square", "the thing"],
                            "bbox": [1, 1, 30, 30]} for i in range(3)])
    write("textvqa.jsonl", [{"question_id": i, "image": f"{i}.png", "question": "what colour?",
                             "answers": ["red"] * 10} for i in range(3)])
    write("mmbench.jsonl", [{"index": i, "image": "0.png", "question": "colour?", "hint": None, "A": "red",
                             "B": "blue", "C": None, "D": None, "answer": "A"} for i in (0, 1, 1000000)])
    write("ocrbench.jsonl", [{"image": f"{i}.png", "question": "read it", "answer": ["hello"],
                              "dataset": "IIIT5K", "question_type": "Regular Text Recognition"} for i in range(2)])
    return d


@pytest.mark.parametrize("name,file,count", [
    ("refcoco_val", "refcoco.jsonl", 6),          # 3 rows x 2 expressions
    ("refcocog_caption_val", "refcap.jsonl", 3),
    ("textvqa_val", "textvqa.jsonl", 3),
    ("mmbench_en_dev", "mmbench.jsonl", 3),       # question 0 twice (a rotation), question 1 once
    ("ocrbench", "ocrbench.jsonl", 2),
])
def test_each_task_type(tiny_model_and_processor, bench_dir, tmp_path, name, file, count):
    model, processor = tiny_model_and_processor
    scores = R.run_benchmark(model, processor, name, str(tmp_path), data=str(bench_dir / file), batch_size=4)
    assert scores["count"] == count and 0.0 <= scores["main"] <= (10.0 if name.endswith("caption_val") else 1.0)
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["benchmarks"][name]["main"] == scores["main"]
    assert f"## {name}" in (tmp_path / "report.md").read_text()
    lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == count
    if name == "refcoco_val":
        # An untrained model emits no box: every prediction is a counted miss, and the grid is drawn.
        assert scores["invalid"] + sum(json.loads(l)["box"] is not None for l in lines) == count
        assert (tmp_path / name / "boxes.png").stat().st_size > 0
        assert "IoU" in (tmp_path / name / "boxes.html").read_text()


def test_resume_continues_and_drops_truncated_line(tiny_model_and_processor, bench_dir, tmp_path):
    model, processor = tiny_model_and_processor
    data = str(bench_dir / "refcoco.jsonl")
    R.run_benchmark(model, processor, "refcoco_val", str(tmp_path), data=data, limit=2, batch_size=2)
    pred = tmp_path / "refcoco_val" / "predictions.jsonl"
    first = pred.read_text().splitlines()
    assert len(first) == 2
    with open(pred, "a") as f:
        f.write('{"id": "2#0", "te')              # a run killed mid-write
    R.run_benchmark(model, processor, "refcoco_val", str(tmp_path), data=data, batch_size=2)
    lines = pred.read_text().splitlines()
    assert lines[:2] == first                      # kept, not recomputed
    assert [json.loads(l)["id"] for l in lines] == ["0#0", "0#1", "1#0", "1#1", "2#0", "2#1"]


def test_family_averages_in_report(tmp_path):
    update_scores(str(tmp_path), "refcoco_val", {"benchmark": "refcoco_val", "family": "fine-grained",
                    "metric": "grounding", "hub_id": "lmms-lab/RefCOCO", "split": "val", "data": None, "in_average": True, "main": 0.5})
    update_scores(str(tmp_path), "blink", {"benchmark": "blink", "family": "fine-grained", "metric": "choice",
                    "hub_id": "BLINK-Benchmark/BLINK", "split": "val", "data": None, "in_average": True,
                    "main": 0.25})
    update_scores(str(tmp_path), "refcocog_caption_val", {"benchmark": "refcocog_caption_val", "family": "fine-grained",
                    "metric": "caption", "hub_id": "lmms-lab/RefCOCOg", "split": "val", "data": None,
                    "in_average": False, "main": 3.1})
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["family_averages"]["fine-grained"] == {"average": 0.375, "benchmarks": 2}
    assert saved["family_averages"]["ocr"] is None
    assert "| fine-grained | 0.3750 | 2 |" in (tmp_path / "report.md").read_text()


def test_cli_main(tiny_checkpoint, bench_dir, tmp_path, capsys):
    R.main(["--model", str(tiny_checkpoint), "--benchmark", "textvqa_val", "--data", str(bench_dir / "textvqa.jsonl"),
            "--limit", "2", "--batch-size", "2", "--output", str(tmp_path), "--device", "cpu"])
    assert json.loads((tmp_path / "scores.json").read_text())["benchmarks"]["textvqa_val"]["count"] == 2
    assert "report:" in capsys.readouterr().out


def _gran(n, split):
    from datasets import Dataset
    from granvit.train.data.schema import GRAN_FEATURES
    from granvit.train.data.synth import SynthConfig, generate_record

    cfg = SynthConfig(image_size=64, min_objects=1, max_objects=2, ocr_fraction=0)
    return Dataset.from_list([generate_record(cfg, 0, split, i) for i in range(n)], features=GRAN_FEATURES)


def test_evaluate_synthetic(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    train, test = _gran(6, "train"), _gran(3, "test")
    out = R.evaluate_synthetic(model, processor, test, train=train, batch_size=4)
    n = sum(len(r["regions"]) for r in test)
    assert out["num_regions"] == n and out["num_images"] == 3
    for key in ("grounding_acc50", "grounding_acc50_baseline", "caption_exact", "caption_exact_baseline"):
        assert 0.0 <= out[key] <= 1.0
    box, caption = R.synthetic_baselines(train)
    assert out["baseline_box"] == box and out["baseline_caption"] == caption


def test_synthetic_baseline_is_the_mean_box_and_top_caption():
    from datasets import Dataset

    rows = [{"width": 100, "height": 50, "regions": [{"bbox": [0, 0, 50, 50], "caption": "a"},
                                                     {"bbox": [50, 0, 100, 25], "caption": "b"}]},
            {"width": 10, "height": 10, "regions": [{"bbox": [0, 0, 10, 10], "caption": "b"}]}]
    box, caption = R.synthetic_baselines(Dataset.from_list(rows))
    # Normalised boxes: [0, 0, .5, 1], [.5, 0, 1, .5], [0, 0, 1, 1] -> mean [1/6, 0, 5/6, 5/6].
    assert box == pytest.approx([1 / 6, 0, 5 / 6, 5 / 6]) and caption == "b"
    assert R.synthetic_baselines(rows) == (box, caption)          # plain rows work too



def test_evaluate_synthetic_from_gran_folder(tiny_model_and_processor, tmp_path):
    from granvit.train.data.synth import SynthConfig, write_synth

    model, processor = tiny_model_and_processor
    write_synth(str(tmp_path), {"train": 4, "test": 2}, SynthConfig(image_size=64, max_objects=2, ocr_fraction=0))
    out = R.evaluate_synthetic(model, processor, str(tmp_path), limit=3, batch_size=2)
    assert out["num_regions"] == 3
    # The baseline came from the folder's train split, not from the evaluated test split.
    train_box, _ = R.synthetic_baselines(R._load_gran(str(tmp_path), "train"))
    assert out["baseline_box"] == train_box


def test_synthetic_needs_baselines(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="needs `train`"):
        R.evaluate_synthetic(model, processor, _gran(1, "test"))


def test_scorers_wire_groups():
    opts = {"A": "red", "B": "blue"}
    recs = [{"text": "A", "target": {"options": opts, "answer": "A", "group": "1"}},
            {"text": "B", "target": {"options": {"A": "blue", "B": "red"}, "answer": "B", "group": "1"}},
            {"text": "B", "target": {"options": opts, "answer": "A", "group": "2"}},
            {"text": "A", "target": {"options": {"A": "blue", "B": "red"}, "answer": "B", "group": "2"}}]
    out = R.SCORERS["circular_choice"](recs)
    assert out["accuracy"] == 0.5 and out["circular_accuracy"] == 0.5 and out["main"] == 0.5
    # HallusionBench: figure groups (subset) and question-pair groups (group).
    hb = [{"text": t, "target": {"answers": [a], "subset": f, "group": q}} for t, a, f, q in
          [("Yes", "1", "f1", "q1"), ("No", "1", "f2", "q1"), ("No", "0", "f1", "q2"), ("No", "0", "f2", "q2")]]
    out = R.SCORERS["yes_no"](hb)
    assert out["accuracy"] == 0.75 and out["figure_accuracy"] == 0.5 and out["question_pair_accuracy"] == 0.5
