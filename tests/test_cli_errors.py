"""Issue 13's table, row by row, through the real console scripts (subprocesses): the exit code, the one-line message
naming the input, and no traceback. Then the helper itself (`granvit.console`) and every script's exit code on a
successful smoke run, in-process; the subprocess versions of those runs are `slow`."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MODULES = {
    "granvit-build": "granvit.train.build",
    "granvit-data": "granvit.train.data.cli",
    "granvit-train": "granvit.train.cli",
    "granvit-quickstart": "granvit.train.quickstart",
    "granvit-eval": "granvit.eval.run",
    "granvit-push": "granvit.hub.publish",
    "granvit-export-encoder": "granvit.hub.export_encoder",
    "granvit-demo": "granvit.spaces.app",
}
REPO = Path(__file__).resolve().parent.parent


def command(script: str, *args) -> list[str]:
    """The installed console script; in a checkout without one, the same `sys.exit(main())` the script runs."""
    if (BIN / script).exists():
        return [str(BIN / script), *map(str, args)]
    code = f"import sys; sys.argv[0] = {script!r}; from {MODULES[script]} import main; sys.exit(main())"
    return [sys.executable, "-c", code, *map(str, args)]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRANVIT_DEBUG": ""}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def error_lines(proc) -> list[str]:
    """stderr without progress bars (they are the command's own output, not errors)."""
    return [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line and "|" not in line]


def assert_user_error(proc, message: str):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc) == [message], proc.stderr[-3000:]
    assert proc.returncode == 2


# ---- the table's rows, as subprocesses (run together: each one starts Python, torch and transformers) ------------
def write_gran(folder: Path, sizes: dict) -> Path:
    from granvit.train.data.synth import SynthConfig, write_synth

    write_synth(str(folder), sizes, SynthConfig(image_size=64, max_objects=2, ocr_fraction=0))
    return folder


def coco_that_keeps_nothing(folder: Path) -> Path:
    """One image whose short side (200 px) fails the paper's > 448 px rule, one image file that is missing."""
    from PIL import Image

    (folder / "imgs").mkdir()
    Image.new("RGB", (300, 200), "red").save(folder / "imgs" / "small.jpg")
    images = [{"id": 1, "file_name": "small.jpg", "width": 300, "height": 200},
              {"id": 2, "file_name": "gone.jpg", "width": 640, "height": 480}]
    annotations = [{"id": k, "image_id": k, "category_id": 1, "bbox": [0, 0, 150, 150]} for k in (1, 2)]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "dog"}]}))
    return path


def empty_split(folder: Path) -> Path:
    """A Gran folder whose train split is one 0-row shard (what convert wrote before it refused to)."""
    from granvit.train.data.schema import Manifest, shard_relpath, write_dataset_card, write_shard

    Manifest(str(folder)).add(write_shard(str(folder), shard_relpath("train", 0, 1), "train", []))
    write_dataset_card(str(folder))
    return folder


def remote_code_checkpoint(tiny_checkpoint, folder: Path) -> Path:
    """A checkpoint of a model_type only its own shipped code knows (config.json auto_map)."""
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "granvit_fork"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def table(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad.json").write_text('{"images": [')  # truncated
    cases = {
        "convert_malformed": command("granvit-data", "convert", "--from", "coco", "out", "--inputs", "bad.json",
                                     "--images", "."),
        "convert_missing": command("granvit-data", "convert", "--from", "coco", "out", "--inputs", "nope.json",
                                   "--images", "."),
        "eval_missing_model": command("granvit-eval", "--model", "/nonexistent/model", "--benchmark", "refcoco_val",
                                      "--limit", 2, "--output", "o"),
        "build_missing_vision": command("granvit-build", "--vision", "/nonexistent/vision", "--llm", tmp, "--out",
                                        "b"),
        "convert_nothing_kept": command("granvit-data", "convert", "--from", "coco", "kept", "--inputs",
                                        coco_that_keeps_nothing(tmp), "--images", tmp / "imgs"),
        "eval_remote_code": command("granvit-eval", "--model", remote_code_checkpoint(tiny_checkpoint, tmp / "fork"),
                                    "--benchmark", "gran", "--data", "gran", "--output", "o"),
        "eval_gran": command("granvit-eval", "--model", tiny_checkpoint, "--benchmark", "gran", "--data",
                             write_gran(tmp / "gran", {"train": 3, "test": 3}), "--split", "test", "--limit", 3,
                             "--batch-size", 4, "--output", "scored"),
    }
    with ThreadPoolExecutor(2) as pool:  # each one is mostly CPU-bound imports
        done = dict(zip(cases, pool.map(lambda cmd: run(cmd, tmp), cases.values())))
    return tmp, done


def test_truncated_json_names_the_file(table):
    _, done = table
    assert_user_error(done["convert_malformed"], "granvit-data: error: bad.json is not valid JSON (Expecting value: "
                      "line 1 column 13 (char 12)); fix the file or export it again")


def test_missing_input_file(table):
    _, done = table
    assert_user_error(done["convert_missing"], "granvit-data: error: nope.json: no such annotation file; check the path")


def test_eval_missing_model_folder(table):
    _, done = table
    assert_user_error(done["eval_missing_model"], "granvit-eval: error: --model /nonexistent/model: no such folder, "
                      "and not a Hub repo id (owner/name); check the path")


def test_build_missing_vision_tower(table):
    _, done = table
    assert_user_error(done["build_missing_vision"], "granvit-build: error: --vision /nonexistent/vision: no such "
                      "folder, and not a Hub repo id (owner/name); check the path")


def test_convert_that_keeps_nothing_fails_with_its_counts(table):
    tmp, done = table
    assert_user_error(done["convert_nothing_kept"], f"granvit-data: error: wrote no rows to kept (train): 2 images "
                      "in, dropped: filtered image_short_side 1, broken missing_image 1; --min-short-side 0 turns the "
                      "short-side filter off; check --images (the folder the annotations' image paths are relative to)")
    assert sorted(p.name for p in (tmp / "kept").iterdir()) == ["counts-train.json"]  # no empty split to resume


def test_validate_fails_an_empty_split(tmp_path, capsys):
    from granvit.train.data.cli import main as data_main

    assert data_main(["validate", str(empty_split(tmp_path))]) == 1  # in-process: the exit code is main's return
    assert json.loads(capsys.readouterr().out) == {"rows": 0, "ok": 0, "broken": {}, "checksum_mismatch": [],
                                                   "unreadable_files": [], "empty_splits": [f"{tmp_path}:train"]}


def test_remote_code_needs_the_flag(table):
    tmp, done = table
    assert_user_error(done["eval_remote_code"], f"granvit-eval: error: {tmp / 'fork'} ships its own model code "
                      "(model_type 'granvit_fork', which neither transformers nor GranViT provides); pass "
                      "--trust-remote-code if you trust that repository")


def test_eval_scores_a_local_gran_split(table):
    from datasets import load_dataset

    tmp, done = table
    proc = done["eval_gran"]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.rsplit("report:", 1)[0])
    test = load_dataset(str(tmp / "gran"), split="test")
    first_three = [row["image_id"] for row in test for _ in row["regions"]][:3]
    assert (printed["benchmark"], printed["split"], printed["num_regions"]) == ("gran", "test", 3)
    assert printed["num_images"] == len(set(first_three))
    assert printed["main"] == printed["grounding_acc50"]
    for key in ("grounding_acc50_unconstrained", "grounding_miou_unconstrained", "caption_exact", "caption_cider",
                "caption_bleu4", "caption_rougeL", "grounding_acc50_baseline", "caption_exact_baseline"):
        assert key in printed, key
    assert printed["grounding_invalid"] == 0  # the box grammar: every answer holds a box
    saved = json.loads((tmp / "scored" / "scores.json").read_text())["benchmarks"]["gran"]
    assert saved["num_regions"] == 3 and "local Gran set `test`" in (tmp / "scored" / "report.md").read_text()
    assert len(json.loads((tmp / "scored" / "gran" / "result.json").read_text())["examples"]) == 3


@pytest.mark.parametrize("module, argv", [("granvit.train.cli", ["--stage", "1", "--config", "nope.yaml"]),
                                          ("granvit.train.quickstart", ["--config", "nope.yaml", "--out", "qs"])])
def test_training_cli_missing_config_in_one_line(module, argv, capsys):
    import importlib

    assert importlib.import_module(module).main(argv) == 2  # in-process: main's return value is the exit code
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("granvit: error: ") and "nope.yaml" in line


# ---- the helper -----------------------------------------------------------------------------------------------------
def test_console_main_exit_codes_and_debug(monkeypatch, capsys):
    from granvit.console import UserError, console_main

    @console_main
    def main(argv):
        if argv == ["user"]:
            raise UserError("thing.json is broken; fix it")
        if argv == ["bug"]:
            raise KeyError("internal")
        return object() if argv else None  # e.g. a trainer

    assert main([]) == 0 and main(["x"]) == 0  # whatever main returns, success is 0, never its repr
    assert main(["user"]) == 2
    assert capsys.readouterr().err == "granvit: error: thing.json is broken; fix it\n"
    with pytest.raises(KeyError):
        main(["bug"])  # a bug keeps its traceback
    with pytest.raises(UserError):
        main(["--debug", "user"])  # --debug is taken out of argv and shows the traceback
    monkeypatch.setenv("GRANVIT_DEBUG", "1")
    with pytest.raises(UserError):
        main(["user"])

    @console_main
    def code(argv):
        return 3

    assert code([]) == 3


def test_user_message_maps_library_errors(tmp_path):
    from granvit.console import user_message
    from huggingface_hub.errors import HFValidationError

    argv = ["--model", "/no/such/model", "--data", str(tmp_path / "x.json")]
    wrapped = OSError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/no/such/model'.")
    wrapped.__cause__ = HFValidationError("Repo id must be in the form ...: '/no/such/model'.")
    assert user_message(wrapped, argv) == (
        "/no/such/model: no such folder, and not a Hub repo id (owner/name); check the path")
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.json"))
    assert user_message(missing, argv) == f"{tmp_path / 'x.json'}: no such file or directory; check the path"
    # A missing file the user never named is a bug in the package, not a user error.
    assert user_message(FileNotFoundError(2, "No such file or directory", "/usr/share/granvit.txt"), argv) is None
    assert user_message(KeyError("x"), argv) is None
    assert user_message(json_error(), [str(tmp_path / "x.json")]).startswith("an input file: could not be parsed")


def json_error():
    try:
        json.loads("{")
    except json.JSONDecodeError as err:
        return err


# ---- each console script exits 0 on a successful smoke run (in-process: main's return value is the exit code) -----
def test_success_exit_codes_in_process(tiny_checkpoint, tmp_path, capsys):
    from granvit.hub.export_encoder import main as export_main
    from granvit.hub.publish import main as push_main
    from granvit.train.build import main as build_main
    from granvit.train.data.cli import main as data_main
    from granvit.train.tiny import save_tiny_parts

    vision, llm = save_tiny_parts(tmp_path / "parts")
    assert build_main(["--vision", str(vision), "--llm", str(llm), "--out", str(tmp_path / "built"),
                       "--num-coord-bins", "20"]) == 0
    assert export_main([str(tiny_checkpoint), str(tmp_path / "vit")]) == 0
    assert push_main([str(tiny_checkpoint), "--repo", "org/granvit", "--space", "org/demo", "--dry-run"]) == 0
    assert data_main(["synth", str(tmp_path / "syn"), "--train", "2", "--val", "0", "--test", "0",
                      "--image-size", "64"]) == 0
    assert data_main(["validate", str(tmp_path / "syn")]) == 0
    out = capsys.readouterr().out
    assert f"to {tmp_path / 'built'}" in out and "Dry run: nothing uploaded." in out


def test_demo_missing_model_in_one_line(capsys):
    from granvit.spaces.app import main as demo_main

    assert demo_main(["--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.endswith(
        "error: --model /nonexistent/model: no such folder, and not a Hub repo id (owner/name); check the path\n")


# ---- the same as subprocesses, and the training CLIs (minutes) -------------------------------------------------------
@pytest.mark.slow
def test_success_exit_codes_as_console_scripts(tiny_checkpoint, tmp_path):
    from granvit.train.tiny import save_tiny_parts

    vision, llm = save_tiny_parts(tmp_path / "parts")
    cases = [
        (command("granvit-build", "--vision", vision, "--llm", llm, "--out", "built", "--num-coord-bins", 20),
         "Saved GranViT (0.1M parameters, 16 image tokens) to built\n"),
        (command("granvit-export-encoder", tiny_checkpoint, "vit"), "Saved SiglipVisionModel (0.1M parameters) to vit\n"),
        (command("granvit-push", tiny_checkpoint, "--repo", "org/granvit", "--dry-run"), None),
        (command("granvit-data", "synth", "syn", "--train", 2, "--val", 0, "--test", 0, "--image-size", 64), None),
    ]
    for cmd, stdout in cases:
        proc = run(cmd, tmp_path)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (cmd, proc.stderr[-3000:])
        assert stdout is None or proc.stdout == stdout
        assert "[WARNING]" not in proc.stdout + proc.stderr  # no library logging (DeepSpeed's accelerator probe)
    proc = run(command("granvit-data", "validate", "syn"), tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["rows"] == 2


@pytest.mark.slow
def test_quickstart_smoke_exits_0(tmp_path):
    proc = run(command("granvit-quickstart", "--smoke", "--out", tmp_path / "qs"), REPO, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # a quiet log: library warnings are not silenced, so none may come (each one is fixed where it comes from)
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if "warn" in line.lower()]


def test_deepspeed_is_told_the_machine_has_no_accelerator(monkeypatch):
    """accelerate imports DeepSpeed on every save when it is installed; its accelerator probe would warn on a machine
    without one, so the console scripts name the accelerator (DS_ACCELERATOR, DeepSpeed's setting) before it probes."""
    import torch

    from granvit import console

    if console.importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed: nothing to tell")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    console._name_deepspeed_accelerator()
    assert "DS_ACCELERATOR" not in os.environ  # a machine with an accelerator is left to DeepSpeed
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    console._name_deepspeed_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    console._name_deepspeed_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "xpu"  # the user's choice is kept
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    probe = "from granvit.console import _name_deepspeed_accelerator as n; n(); import deepspeed.accelerator as a; a.get_accelerator()"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Setting accelerator" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_train_smoke_exits_0_and_prints_no_trainer(tmp_path):
    proc = run(command("granvit-train", "--stage", 1, "--config", REPO / "train/configs/cli_tiny_cpu.yaml",
                       f"output_dir={tmp_path}", "training.max_steps=2"), REPO, timeout=600)
    assert "Trainer object at" not in proc.stdout + proc.stderr
    assert proc.returncode == 0 and (tmp_path / "stage1" / "final" / "config.json").is_file()
