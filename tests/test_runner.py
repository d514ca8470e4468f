"""One runner behind every entry point: `granvit-train --stage 1` then `--stage 2` (one stage per process, through
saved checkpoints) trains exactly what the main job trains in one process (phases chained in memory)."""
from pathlib import Path

import torch
from granvit import GranViTForConditionalGeneration
from granvit.train.recipe import load_recipe
from granvit.train.runner import make_trainer, run, RunState

CONFIG = str(Path(__file__).resolve().parent.parent / "train" / "configs" / "cli_tiny_cpu.yaml")
SMALL = ["data.sizes.train=8", "training.max_steps=3", "training.logging_steps=1", "training.save_strategy='no'", "training.disable_tqdm=true",
         "phases.stage2.tasks.bbox2caption=1.0"]


def test_stage_by_stage_equals_one_process(tmp_path):
    cli = load_recipe(CONFIG, [f"output_dir={tmp_path / 'cli'}", *SMALL])
    run(cli, only=["stage1"])
    run(cli, only=["stage2"])  # a new start: reads stage1/final from disk
    by_stage = GranViTForConditionalGeneration.from_pretrained(tmp_path / "cli" / "stage2" / "final").state_dict()

    main_job = load_recipe(CONFIG, [f"output_dir={tmp_path / 'main'}", *SMALL])
    model, processor, state, _ = run(main_job)
    assert [e["phase"] for e in state.curve["loss"]][-1] == "stage2"
    changed = 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, by_stage[name], rtol=0, atol=0, msg=name)
        changed += 1
    assert changed and model.config.trained_tasks == ["bbox2caption", "caption2bbox"]


def test_both_entry_points_build_the_same_trainer(tmp_path):
    """The trainer class, its arguments, the first batch and its loss, for the phase either entry point runs."""
    recipe = load_recipe(CONFIG, [f"output_dir={tmp_path}", *SMALL])
    model, processor, _, folder = run(recipe, only=[])  # data + parts + build only
    from granvit.train.runner import load_split

    train = load_split(folder, "train")
    first = make_trainer(recipe, "stage1", model, processor, train, RunState())
    again = make_trainer(load_recipe(CONFIG, [f"output_dir={tmp_path}", *SMALL]), "stage1", model, processor, train, RunState())
    assert type(first).__name__ == type(again).__name__ == "Stage1Trainer"
    assert first.args.to_dict() == again.args.to_dict()
    batch = first.data_collator([first.train_dataset[0], first.train_dataset[1]])
    other = again.data_collator([again.train_dataset[0], again.train_dataset[1]])
    assert all(torch.equal(batch[k], other[k]) for k in ("input_ids", "labels", "pixel_values", "crop_pixel_values"))
    # all queries of an image sit in one item: one Bbox2Caption row per region (at most regions_per_image = 2)
    expected = [min(2, len(train[i]["regions"])) for i in (0, 1)]
    assert [len(first.train_dataset[i]) for i in (0, 1)] == expected and batch["input_ids"].shape[0] == sum(expected)
    first.model.eval()
    with torch.no_grad():
        assert torch.equal(first.compute_loss(first.model, dict(batch)), again.compute_loss(again.model, dict(other)))
