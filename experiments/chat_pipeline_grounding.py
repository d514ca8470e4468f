"""Held-out grounding of a trained checkpoint through transformers' own ``pipeline("image-text-to-text")`` with chat
messages, against ``model.ground`` on the same phrases (issue 23): the same boxes, and no answer that does not parse.
Run it in a process that has only transformers (+ datasets, to read the split) and the checkpoint's own code:

    python -I experiments/chat_pipeline_grounding.py outputs/quickstart/checkpoint outputs/quickstart/data

Every region of the ``test`` split is asked with the checkpoint's Caption2Bbox template typed as a user message; the
first box of an answer is right when its IoU with that region is >= 0.5 (the main job's grounding ACC@0.5). Prints
one ``REPORT`` line: regions, both scores, how many answers gave ``model.ground``'s boxes exactly, unparseable answers.
"""

import json
import sys
import time

sys.modules["granvit"] = None  # only the checkpoint's own code, even where the package is installed
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline  # noqa: E402


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main(checkpoint: str, data: str) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    budget = 2 * processor.max_box_tokens + 4  # model.ground's default
    test = load_dataset("parquet", data_files=f"{data}/data/test-*.parquet", split="train")
    counts = {"regions": 0, "pipeline_hits": 0, "ground_hits": 0, "same_boxes": 0, "unparseable": 0}
    start = time.time()
    for row in test:
        image = row["image"].convert("RGB")
        grounded = model.ground(processor, image, [region["caption"] for region in row["regions"]])
        for region, ground_boxes in zip(row["regions"], grounded):
            typed = processor.caption2bbox_template.replace("{caption}", region["caption"])
            messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": typed}]}]
            [chat] = pipe(text=messages, max_new_tokens=budget)
            answer = chat["generated_text"][-1]["content"]
            boxes = processor.post_process_grounding([answer], [image.size])[0]
            counts["regions"] += 1
            counts["unparseable"] += not boxes and not processor.is_not_found(answer)
            counts["same_boxes"] += [list(map(float, b)) for b in boxes] == [list(map(float, b)) for b in ground_boxes]
            counts["pipeline_hits"] += bool(boxes) and iou(boxes[0], region["bbox"]) >= 0.5
            counts["ground_hits"] += bool(ground_boxes) and iou(ground_boxes[0], region["bbox"]) >= 0.5
    return {"regions": counts["regions"], "pipeline_acc50": counts["pipeline_hits"] / counts["regions"],
            "ground_acc50": counts["ground_hits"] / counts["regions"], "same_boxes": counts["same_boxes"],
            "unparseable": counts["unparseable"], "seconds": round(time.time() - start)}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -I experiments/chat_pipeline_grounding.py CHECKPOINT GRAN_FOLDER")
    print("REPORT " + json.dumps(main(sys.argv[1], sys.argv[2])))
