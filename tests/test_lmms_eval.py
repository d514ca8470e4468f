"""The lmms-eval path end to end: the `granvit` model on the local region tasks, through the real CLI."""
import glob
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pyarrow.parquet as pq
import pytest

from granvit.eval.metrics import exact_match, grounding_scores

pytest.importorskip("lmms_eval")

# Until the package is reinstalled with the `lmms_eval.models` entry point, the CLI is started with the
# manifest registered by hand (the registry the entry point feeds); afterwards `python -m lmms_eval` itself.
LAUNCH = """
import sys
import lmms_eval.models as models
from granvit.eval.lmms_eval_granvit import MANIFEST
models.MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)
from lmms_eval.__main__ import cli_evaluate
sys.argv = ["lmms_eval"] + sys.argv[1:]
cli_evaluate()
"""


def _gran(n):
    from datasets import Dataset
    from granvit.train.data.schema import GRAN_FEATURES
    from granvit.train.data.synth import SynthConfig, generate_record

    cfg = SynthConfig(image_size=64, min_objects=1, max_objects=2, ocr_fraction=0)
    return Dataset.from_list([generate_record(cfg, 0, "test", i) for i in range(n)], features=GRAN_FEATURES)


def test_lmms_eval_cli_on_local_region_tasks(tiny_checkpoint, tmp_path):
    from granvit.eval.lmms_eval_granvit import export_regions, write_tasks

    export_regions(_gran(2), str(tmp_path / "regions.parquet"), limit=3)
    tasks = write_tasks(str(tmp_path / "regions.parquet"), str(tmp_path / "tasks"))
    installed = any(ep.name == "granvit" for ep in entry_points(group="lmms_eval.models"))
    cmd = [sys.executable] + (["-m", "lmms_eval"] if installed else ["-c", LAUNCH]) + [
        "--model", "granvit", "--model_args", f"pretrained={tiny_checkpoint},device=cpu",
        "--tasks", "granvit_grounding,granvit_regcap", "--include_path", tasks, "--batch_size", "2",
        "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    # The lmms-eval CLI exits 0 even when a task throws: the results file is the real check.
    found = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    assert proc.returncode == 0 and found, proc.stderr[-3000:]
    with open(found[0]) as f:
        results = json.load(f)["results"]
    assert set(results) == {"granvit_grounding", "granvit_regcap"}
    # The aggregates are exactly what granvit's metrics give for the logged answers against the Parquet's truth.
    truth = pq.read_table(tmp_path / "regions.parquet", columns=["bbox", "caption"]).to_pylist()

    def logged(task):
        (path,) = glob.glob(str(tmp_path / "out" / "*" / f"*_samples_{task}.jsonl"))
        with open(path) as f:
            rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
        return [r["filtered_resps"] for r in rows], [truth[r["doc_id"]] for r in rows]

    answers, refs = logged("granvit_grounding")
    assert len(answers) == 3 and all(a.startswith("[") for a in answers)  # the box grammar: every answer is a box
    boxes = [json.loads(a) for a in answers]
    assert results["granvit_grounding"]["acc50,none"] == grounding_scores(boxes, [r["bbox"] for r in refs])["acc@0.5"]
    assert results["granvit_grounding"]["invalid,none"] == 0
    captions, refs = logged("granvit_regcap")
    assert results["granvit_regcap"]["exact,none"] == exact_match(captions, [r["caption"] for r in refs])


def test_adapter_dispatches_on_granvit_task(tiny_checkpoint):
    from granvit.eval.lmms_eval_granvit import GranViTLmms
    from PIL import Image

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = GranViTLmms(pretrained=str(tiny_checkpoint), device="cpu", batch_size=2)
    image = Image.new("RGB", (40, 30), "red")
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    visual = lambda doc: [doc["image"]]
    out = lm.generate_until([
        Req("the red thing", {"granvit_task": "grounding", "max_new_tokens": 6, "until": []}, visual, 0, "t", "test"),
        Req("[1, 1, 20, 20]", {"granvit_task": "region_caption", "max_new_tokens": 4}, visual, 0, "t", "test"),
        Req("what colour?", {"max_new_tokens": 4, "until": ["\n"]}, visual, 0, "t", "test"),
    ])
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # Grounding: the box model.ground finds (the same greedy, grammar-constrained answer), despite the task's tiny budget.
    [[first, *_]] = lm.model.ground(lm.processor, image, ["the red thing"])
    assert out[0] == json.dumps([round(v, 2) for v in first])
    with pytest.raises(ValueError, match="unknown granvit_task"):
        lm.generate_until([Req("x", {"granvit_task": "nope"}, visual, 0, "t", "test")])
    (logp, greedy), = lm.loglikelihood([Req("what colour?", "red", visual, 0, "t", "test")])
    assert logp < 0 and isinstance(greedy, bool)
