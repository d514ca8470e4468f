"""The encoder-transfer protocol (experiments/transfer.py) end to end on its smoke preset, and its recipes."""

import json

import torch

from granvit.experiments.transfer import encoder_recipe, load_plan, main, summary_markdown, transfer_recipe
from granvit.train.data.downstream import BENCHMARKS


def test_rows_train_stage1_or_everything_for_the_same_steps():
    scale, rows = load_plan(smoke=False)
    stage1, nodistill, joint = (encoder_recipe(scale, rows[r], seed=1, smoke=False) for r in ("stage1", "stage1_nodistill", "joint"))
    assert list(stage1["phases"]) == ["stage1"] and stage1["phases"]["stage1"]["stage"] == "1"
    assert stage1["phases"]["stage1"]["training"]["max_steps"] == scale["encoder_steps"]
    assert (stage1["training"]["distill_lambda"], nodistill["training"]["distill_lambda"]) == (1.0, 0.0)
    assert joint["phases"] == {"joint": {"stage": "joint", "tasks": {"bbox2caption": 1.0, "caption2bbox": 1.0},
                                         "training": {"max_steps": scale["encoder_steps"]}}}
    assert stage1["seed"] == 1 and stage1["parts"] is None  # the seed moves the run, never the (shipped) parts

    transfer = transfer_recipe(stage1, scale, "build", "downstream", "work")
    assert transfer["phases"]["transfer"]["stage"] == "2"  # the ViT frozen: the encoder is what is compared
    assert transfer["phases"]["transfer"]["tasks"] == {"downstream": 1.0}
    assert transfer["model"]["checkpoint"] == "build" and transfer["model"]["vision"] is None  # the build, nothing else
    assert transfer["data"]["path"] == "downstream"
    assert "distill_lambda" not in transfer["training"] and transfer["training"]["per_device_train_batch_size"] == 16


def test_smoke_transfers_two_encoders_keeps_them_frozen_and_scores_every_benchmark(tmp_path):
    written = main(["--smoke", "--seeds", "0", "--rows", "siglip", "stage1", "--out", str(tmp_path), "--jobs", "1"])
    runs = {p.name: json.loads(p.read_text()) for p in written}
    assert set(runs) == {"siglip_seed0.json", "stage1_seed0.json"}
    for run in runs.values():
        assert run["encoder_unchanged"] is True  # bitwise: transfer training never touched the frozen encoder
        assert set(run["downstream"]["benchmarks"]) == set(BENCHMARKS)
        assert all(0.0 <= b["score"] <= 1.0 for b in run["downstream"]["benchmarks"].values())
        assert set(run["downstream"]["families"]) == {"fine-grained", "vqa", "ocr"}
        assert run["transfer_steps"] == 2 and run["probe"]["probe_test_regions"] > 0
    assert runs["stage1_seed0.json"]["encoder_steps"] == 2 and "encoder_steps" not in runs["siglip_seed0.json"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| siglip | 1 |" in summary and "| stage1 | 1 |" in summary and (tmp_path / "transfer.png").stat().st_size > 0
    # a second call reuses the finished runs instead of training again
    assert main(["--smoke", "--seeds", "0", "--rows", "siglip", "--out", str(tmp_path), "--jobs", "1"]) == [tmp_path / "runs" / "siglip_seed0.json"]


def test_the_exported_encoder_is_the_trained_tower(tmp_path):
    """The stage-1 row's encoder, exported and rebuilt by granvit-build, holds exactly the trained ViT's weights."""
    from granvit.experiments.transfer import make_encoder
    from granvit.experiments.ablations import data_dir_for
    from granvit.train.build import build_granvit
    from granvit.modeling_granvit import GranViTForConditionalGeneration

    scale, rows = load_plan(smoke=True)
    recipe = encoder_recipe(scale, rows["stage1"], seed=0, smoke=True)
    synth = data_dir_for(recipe, 16, tmp_path / "data")
    encoder, llm, info = make_encoder("stage1", recipe, synth, tmp_path)
    trained = GranViTForConditionalGeneration.from_pretrained(tmp_path / "encoder-checkpoint").model.vision_tower
    rebuilt = build_granvit(str(encoder), str(llm), num_coord_bins=recipe["model"]["num_coord_bins"])[0].model.vision_tower
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), rebuilt.state_dict().values()))
    assert info["encoder_steps"] == 2


def test_summary_reports_means_and_sample_stds_of_known_runs():
    """Two seeds of one row with known scores: the family averages, their mean and the spread in the table's cells."""
    def run(seed, scores):  # scores per family, as fractions
        benchmarks = {f"b_{f}": {"family": f, "metric": "exact", "score": v} for f, v in scores.items()}
        return {"row": "siglip", "seed": seed, "downstream": {"benchmarks": benchmarks, "families": dict(scores)},
                "probe": {"probe_shape_acc": 0.5, "probe_colour_acc": 1.0}, "timings": {"total_s": 100.0 + seed},
                "encoder_unchanged": True}

    runs = {"siglip": [run(0, {"fine-grained": 0.1, "vqa": 0.2, "ocr": 0.0}), run(1, {"fine-grained": 0.3, "vqa": 0.4, "ocr": 0.2})]}
    table = summary_markdown(runs, ["siglip"])
    # fine-grained 10 / 30 -> 20.0 ± 14.1 (sample std); average of the families 10.0 / 30.0 -> 20.0 ± 14.1
    assert "| siglip | 2 | 20.0 ± 14.1 | 30.0 ± 14.1 | 10.0 ± 14.1 | 20.0 ± 14.1 | 50.0 ± 0.0 | 100.0 ± 0.0 | 100 |" in table
    assert "| b_vqa | vqa | exact | 30.0 ± 14.1 |" in table and "bitwise unchanged by transfer training in every run: True" in table
