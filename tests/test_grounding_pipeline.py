"""Grounding through transformers' own pipeline("image-text-to-text") with chat messages, in a fresh process that has
only transformers and the checkpoint's code: every answer parses, and the boxes are model.ground's."""

import json
import os
import subprocess
import sys
import textwrap

from conftest import every_box_format

tiny_checkpoint, tiny_model_and_processor = every_box_format()  # once per box format

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["granvit"] = None  # only the checkpoint's own code
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    ckpt = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    pipe = pipeline("image-text-to-text", model=ckpt, trust_remote_code=True)
    template = processor.caption2bbox_template
    budget = 2 * processor.max_box_tokens + 4  # model.ground's default
    report = {"pipeline": [], "plain": [], "ground": [], "unparseable": 0}
    for k, colour in enumerate(["red", "blue", "green"]):
        image = Image.new("RGB", (80 + 16 * k, 48), "white")
        image.paste(Image.new("RGB", (20, 20), colour), (10 + 8 * k, 10))
        phrases = [f"{colour} square", f"the {colour} square on the left of a white picture"]
        report["ground"] += [g["boxes"] for g in model.ground(processor, image, phrases, return_scores=True)]
        for phrase in phrases:
            typed = template.replace("{caption}", phrase)
            messages = [{"role": "user",
                         "content": [{"type": "image", "image": image}, {"type": "text", "text": typed}]}]
            [chat] = pipe(text=messages, max_new_tokens=budget)
            answer = chat["generated_text"][-1]["content"]
            boxes = processor.post_process_grounding([answer], [image.size])[0]
            report["unparseable"] += not boxes and not processor.is_not_found(answer)
            report["pipeline"].append(boxes)
            [plain] = pipe(images=image, text=typed, max_new_tokens=budget, return_full_text=False)
            report["plain"].append(processor.post_process_grounding([plain["generated_text"]], [image.size])[0])
    print("REPORT " + json.dumps(report))
    """
)


def test_pipeline_chat_grounding_equals_model_ground(tmp_path, tiny_checkpoint):
    script = tmp_path / "ground.py"
    script.write_text(FRESH_PROCESS)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-I", str(script), str(tiny_checkpoint)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["unparseable"] == 0
    assert report["pipeline"] == report["ground"] == report["plain"]
    assert all(len(boxes) >= 1 for boxes in report["pipeline"])  # the paper's grammar: a box in every answer
