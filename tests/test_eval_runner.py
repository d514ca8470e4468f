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
    # Different references per row: CIDEr-D weighs n-grams by how rare they are across the set's references.
    write("refcap.jsonl", [{"question_id": i, "image": f"{i}.png", "answer": [f"a {c} square on white paper"],
                            "bbox": [1, 1, 30, 30]} for i, c in enumerate(["red", "blue", "green"])])
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
    assert scores["count"] == count  # the scores themselves: test_known_answers_score_exactly
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["benchmarks"][name]["main"] == scores["main"]
    assert f"## {name}" in (tmp_path / "report.md").read_text()
    lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == count
    if name == "refcoco_val":
        # Decoded under the box grammar, even the untrained model answers with a box every time; the grid is drawn.
        assert scores["invalid"] == 0 and all(json.loads(l)["box"] is not None for l in lines)
        assert (tmp_path / name / "boxes.png").stat().st_size > 0
        assert "IoU" in (tmp_path / name / "boxes.html").read_text()


def _oracle(wrong: bool):
    """A stand-in for `predict` that answers every sample with its reference (or with a wrong answer): what a perfect
    (or a hopeless) model would write, so a scorer's result is known exactly."""

    def predict(model, processor, samples, task_type, max_new_tokens=None, unconstrained=True):
        records = []
        for s in samples:
            target = {k: v for k, v in s.items() if k not in ("id", "image")}
            target["image_size"] = list(s["image"].size)
            rec = {"id": s["id"], "target": target}
            if task_type == "grounding":
                x1, y1, x2, y2 = s["box"]
                rec["box"] = [x2 + 1, y2 + 1, x2 + 5, y2 + 5] if wrong else list(s["box"])  # disjoint, or exact
                rec["text"] = rec["text_unconstrained"] = ""
                rec["box_unconstrained"] = rec["box"]
            elif task_type == "region_caption":
                rec["text"] = "zebra crossing at night" if wrong else s["references"][0]
            elif task_type == "multiple_choice":
                rec["text"] = next(k for k, v in s["options"].items() if v and k != s["answer"]) if wrong else s["answer"]
            else:
                rec["text"] = "zzz" if wrong else s["answers"][0]
            records.append(rec)
        return records

    return predict


@pytest.mark.parametrize("name,file", [("refcoco_val", "refcoco.jsonl"), ("refcocog_caption_val", "refcap.jsonl"),
                                       ("textvqa_val", "textvqa.jsonl"), ("mmbench_en_dev", "mmbench.jsonl"),
                                       ("ocrbench", "ocrbench.jsonl")])
def test_known_answers_score_exactly(bench_dir, tmp_path, monkeypatch, name, file):
    """Rows -> samples -> predictions file -> scorer -> scores.json, with a perfect and a hopeless predictor: the
    headline is 1 and 0 (for captions CIDEr-D, which is not bounded by 1: BLEU-1 is then 1)."""
    scores = {}
    # Caption scoring starts Java twice (PTB tokenizer, METEOR): the hopeless case there is test_metrics' business.
    for wrong in (False,) if name == "refcocog_caption_val" else (False, True):
        monkeypatch.setattr(R, "predict", _oracle(wrong))
        out = tmp_path / str(wrong)
        scores[wrong] = R.run_benchmark(None, None, name, str(out), data=str(bench_dir / file), batch_size=4)
    if name == "refcocog_caption_val":
        assert scores[False]["bleu1"] == pytest.approx(1.0) and scores[False]["main"] > 1.0
    else:
        assert (scores[False]["main"], scores[True]["main"]) == (1.0, 0.0)
    if name == "refcoco_val":
        assert scores[False]["miou"] == 1.0 and scores[True]["miou"] == 0.0 and scores[True]["invalid"] == 0


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
    assert out["grounding_invalid"] == 0  # the box grammar: every answer holds a box
    box, caption = R.synthetic_baselines(train)
    assert out["baseline_box"] == box and out["baseline_caption"] == caption


def _same_region_set(n):
    """n images that each hold one region with the same box and caption: the mean-box and top-caption baselines are
    then exactly right (1.0)."""
    from datasets import Dataset
    from granvit.train.data.schema import GRAN_FEATURES

    rows = []
    for i in range(n):
        image = Image.new("RGB", (64, 48), "white")
        image.paste((200, 20, 20), (8, 8, 40, 40))
        buffer = __import__("io").BytesIO()
        image.save(buffer, "PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "image_id": f"s{i}", "width": 64, "height": 48,
                     "source": "test", "kind": 0, "regions": [{"bbox": [8, 8, 40, 40], "caption": "red square", "kind": 0}]})
    return Dataset.from_list(rows, features=GRAN_FEATURES)


@pytest.mark.parametrize("wrong", [False, True])
def test_evaluate_synthetic_known_answers(monkeypatch, wrong):
    data = _same_region_set(3)
    monkeypatch.setattr(R, "predict", _oracle(wrong))
    out = R.evaluate_synthetic(None, None, data, train=data, batch_size=2)
    expected = 0.0 if wrong else 1.0
    assert (out["grounding_acc50"], out["grounding_miou"], out["caption_exact"]) == (expected, expected, expected)
    assert out["grounding_acc50_unconstrained"] == expected
    assert out["grounding_acc50_baseline"] == 1.0 and out["caption_exact_baseline"] == 1.0
    assert out["baseline_box"] == pytest.approx([8 / 64, 8 / 48, 40 / 64, 40 / 48]) and out["baseline_caption"] == "red square"


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
