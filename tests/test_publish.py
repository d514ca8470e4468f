"""granvit-push offline: the dry run lists exactly the files; an upload through class-patched HfApi methods lands in
a local folder; that folder, laid out as an offline Hub cache, loads with trust_remote_code in a fresh process."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
from PIL import Image
from granvit import GranViTModel
from granvit.console import UserError
from granvit.hub import publish
from granvit.spaces.demo_examples import write_demo_examples
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, SpaceCard

RUNNER_SCORES = {
    "benchmarks": {
        "refcoco_val": {"benchmark": "refcoco", "family": "grounding", "metric": "acc@0.5",
                        "hub_id": "lmms-lab/RefCOCO", "split": "val", "data": None, "in_average": True,
                        "main": 0.4321, "miou": 0.38},
    },
    "family_averages": {"grounding": {"average": 0.4321, "benchmarks": 1}, "ocr": None},
}
TRAINING_YAML = "seed: 0\nstage1:\n  steps: 300  # 300 steps * 8 images = 2,400 images\n"


@pytest.fixture
def run_dir(tiny_checkpoint, tmp_path):
    """A quickstart-like run folder: checkpoint/ (+ trainer leftovers), scores.json, training_config.yaml."""
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "checkpoint")
    (run / "checkpoint" / "optimizer.pt").write_bytes(b"not for users")
    (run / "checkpoint" / ".DS_Store").write_bytes(b"")
    image = Image.new("RGB", (40, 30), "red")
    write_demo_examples(run / "checkpoint", [{"image": image, "width": 40, "height": 30, "image_id": "a",
                                              "regions": [{"bbox": [2, 3, 20, 25], "caption": "a red box"}]}])
    (run / "scores.json").write_text(json.dumps({"grounding_acc50": 0.61, "caption_exact": 0.25, "num_images": 40,
                                                 "curve": {"loss": [1.0]}}))
    (run / "training_config.yaml").write_text(TRAINING_YAML)
    return run


def listed(output: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in output.splitlines():
        if ": " in line and line.split(" ", 1)[0] in ("model", "space"):
            head, rest = line.split(": ", 1)
            repo_type, repo_id = head.split(" ")
            rows.add((repo_type, repo_id, rest.split(" (")[0]))
    return rows


def test_dry_run_lists_exactly_the_files(run_dir, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    for name in ("create_repo", "create_commit", "add_space_variable"):
        monkeypatch.setattr(HfApi, name, no_network)
    publish.main([str(run_dir / "checkpoint"), "--repo", "org/granvit", "--space", "org/granvit-demo", "--dry-run"])
    rows = listed(capsys.readouterr().out)
    weights_and_code = {p.name for p in (run_dir / "checkpoint").iterdir()} - {"optimizer.pt", ".DS_Store", "examples"}
    examples = {"examples/examples.json", "examples/0.png"}  # the demo's held-out examples, in both repos
    expected = {("model", "org/granvit", name) for name in weights_and_code | examples | {"README.md", "scores.json",
                                                                                          "training_config.yaml"}}
    expected |= {("space", "org/granvit-demo", name)
                 for name in {"app.py", "demo_examples.py", "requirements.txt", "README.md"} | examples}
    expected.add(("space", "org/granvit-demo", "variable GRANVIT_MODEL=org/granvit"))
    assert rows == expected
    assert {"model.safetensors", "config.json", "modeling_granvit.py", "region_decoding_granvit.py"} <= weights_and_code


def test_model_card_metadata_usage_scores_and_config(run_dir):
    checkpoint = run_dir / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["_name_or_path"] = "google/siglip2-base-patch16-512"  # the tiny build has local paths
    (checkpoint / "config.json").write_text(json.dumps(config))
    card = publish.model_card(checkpoint, "org/granvit", datasets=["org/gran-29m"], scores=RUNNER_SCORES,
                              training_config=TRAINING_YAML, space_id="org/granvit-demo")
    card = ModelCard(str(card))  # parses back
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == ["google/siglip2-base-patch16-512"]  # the LLM's local path is not a base model
    assert card.data.datasets == ["org/gran-29m"] and card.data.license == "apache-2.0"
    assert {"granvit", "custom_code", "siglip_vision_model", "qwen2"} <= set(card.data.tags)
    assert 'AutoModelForImageTextToText.from_pretrained("org/granvit", trust_remote_code=True)' in card.text
    assert "| refcoco_val | grounding | lmms-lab/RefCOCO `val` | acc@0.5 | 0.4321 |" in card.text
    assert "| grounding | 0.4321 | 1 |" in card.text and "| ocr |" not in card.text
    assert "300 steps * 8 images = 2,400 images" in card.text
    assert "https://huggingface.co/spaces/org/granvit-demo" in card.text


def test_flat_scores_table_keeps_numbers_only():
    table = publish.eval_table({"grounding_acc50": 0.61, "num_images": 40, "ok": True, "curve": {"loss": [1.0]}})
    assert table.splitlines()[2:] == ["| grounding_acc50 | 0.6100 |", "| num_images | 40 |"]


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        publish.plan(tmp_path, "org/granvit")


class FakeHub:
    """HfApi patched on the class (transformers and datasets make their own HfApi instances); writes land in a
    folder."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.repos, self.variables = root, [], {}
        hub = self

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, space_sdk=None, **kwargs):
            hub.repos.append((repo_type or "model", repo_id, private, space_sdk))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
            folder = hub.folder(repo_type or "model", repo_id)
            for op in operations:
                target = folder / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                with op.as_file() as source:
                    target.write_bytes(source.read())
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=commit_message, commit_description="", oid="0" * 40)

        def add_space_variable(self, repo_id, key, value, **kwargs):
            hub.variables[(repo_id, key)] = value

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "add_space_variable", add_space_variable)
        monkeypatch.setattr(HfApi, "preupload_lfs_files", lambda *a, **k: None)
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda *a, **k: None)
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)

    def folder(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id


def populate_hf_cache(folder: Path, repo_id: str, hf_home: Path) -> None:
    """Lay a repo folder out as huggingface_hub's cache: blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


FRESH_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["granvit"] = None  # only the code that came with the repo may be used
    from transformers import AutoModel
    model = AutoModel.from_pretrained("org/granvit", trust_remote_code=True)
    checksum = sum(float(p.double().sum()) for p in model.state_dict().values())
    report = {"class": type(model).__name__, "module": type(model).__module__, "checksum": checksum}
    print("REPORT " + json.dumps(report))
    """
)


def test_push_lands_in_a_folder_that_loads_offline_in_a_fresh_process(run_dir, tmp_path, monkeypatch, capsys):
    hub = FakeHub(tmp_path / "remote", monkeypatch)
    publish.main([str(run_dir / "checkpoint"), "--repo", "org/granvit", "--space", "org/granvit-demo", "--private"])
    assert "Committed https://huggingface.co/org/granvit/commit/" in capsys.readouterr().out
    assert hub.repos == [("model", "org/granvit", True, None), ("space", "org/granvit-demo", True, "gradio")]
    assert hub.variables == {("org/granvit-demo", "GRANVIT_MODEL"): "org/granvit"}

    model_dir = hub.folder("model", "org/granvit")
    planned = publish.plan(run_dir / "checkpoint", "org/granvit")[0].files
    assert {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()} == set(planned)
    assert (model_dir / "model.safetensors").read_bytes() == (run_dir / "checkpoint" / "model.safetensors").read_bytes()
    space_dir = hub.folder("space", "org/granvit-demo")
    assert sorted(p.relative_to(space_dir).as_posix() for p in space_dir.rglob("*") if p.is_file()) == [
        "README.md", "app.py", "demo_examples.py", "examples/0.png", "examples/examples.json", "requirements.txt"]
    space_card = SpaceCard.load(space_dir / "README.md")
    assert space_card.data.models == ["org/granvit"] and space_card.data.sdk == "gradio"

    # The Space finds the demo examples in its own folder, or in the model repo (here: this process's offline cache).
    from granvit.spaces import app as space_app
    from huggingface_hub import constants

    populate_hf_cache(model_dir, "org/granvit-examples", Path(constants.HF_HOME))
    [example] = space_app.find_examples("org/granvit-examples")
    assert example["regions"] == [{"bbox": [2.0, 3.0, 20.0, 25.0], "caption": "a red box"}]
    assert space_app.load_demo_examples(space_dir / "examples") == [{**example, "image": str(
        (space_dir / "examples" / "0.png").resolve())}]

    hf_home = tmp_path / "hf_home"
    populate_hf_cache(model_dir, "org/granvit", hf_home)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert report["class"] == "GranViTModel"
    assert report["module"].startswith("transformers_modules.org.granvit.")  # the repo's own code, not the package
    reference = GranViTModel.from_pretrained(run_dir / "checkpoint")
    assert report["checksum"] == sum(float(p.double().sum()) for p in reference.state_dict().values())
