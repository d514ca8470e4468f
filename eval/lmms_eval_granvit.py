"""lmms-eval adapter: `python -m lmms_eval --model granvit --model_args pretrained=DIR ...`.

Registered through the entry point `[lmms_eval.models] granvit = granvit.eval.lmms_eval_granvit:MANIFEST`
(lmms-eval >= 0.7 reads that group; needs `pip install lmms-eval==0.7.3 "filelock<4"`: filelock 4 breaks
its `simple_evaluate`). Any lmms-eval `generate_until` task runs as VQA (the task text becomes the
question); decoding is always greedy, so sampling settings (temperature, top_p, num_beams) are not used.
GranViT's own region tasks set `granvit_task` in their generation_kwargs:

    grounding        the task text is a caption; the answer is the decoded box "[x1, y1, x2, y2]" (pixels) or ""; the
                     token budget is the checkpoint's box format's (one box and its eos), whatever the task says
    region_caption   the task text is a JSON box "[x1, y1, x2, y2]" (pixels); the answer is the caption

Local region tasks over a Parquet file of (image, bbox, caption) rows:

    python -m granvit.eval.lmms_eval_granvit make-tasks --data regions.parquet --out ./granvit_tasks
    python -m lmms_eval --model granvit --model_args pretrained=DIR,device=cpu \
        --tasks granvit_grounding,granvit_regcap --include_path ./granvit_tasks --output_path ./out
    ls out/*/*_results.json     # check it: the lmms-eval CLI exits 0 even when a task throws

Grounding decodes under the box grammar, as `model.ground` does. GranViT checkpoints load with the installed package;
`trust_remote_code=true` in `--model_args` lets a checkpoint that ships other model code run it (opt-in, as in
`granvit-eval --trust-remote-code`).
"""
import argparse
import json
import os
import shutil

import torch
from datasets import Dataset, Features, Image, List, Value
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from granvit.eval.benchmarks import to_pil
from granvit.eval.run import box_grammar, build_prompt, generate, grounding_budget, load_model

MANIFEST = ModelManifest(model_id="granvit", simple_class_path="granvit.eval.lmms_eval_granvit.GranViTLmms")
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_tasks")


class GranViTLmms(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size=1, dtype: str = "auto",
                 trust_remote_code=False, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown granvit model_args: {sorted(kwargs)}")
        # model_args arrive as text ("True", "false") or already parsed, depending on the lmms-eval entry point.
        trust = str(trust_remote_code).strip().lower()
        if trust not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"trust_remote_code={trust_remote_code!r}: expected true or false")
        self.model, self.processor = load_model(pretrained, device, dtype, trust in ("true", "1", "yes"))
        self.batch_size = int(batch_size)

    @staticmethod
    def _sample(kind: str, context: str, image) -> dict:
        """An lmms-eval request as the canonical sample of its task type (eval/benchmarks.py)."""
        if kind == "grounding":
            return {"expression": context, "image": image}
        if kind == "region_caption":
            return {"box": json.loads(context), "image": image}
        if kind == "vqa":
            return {"question": context, "image": image}
        raise ValueError(f"unknown granvit_task {kind!r} (grounding, region_caption or vqa)")

    def generate_until(self, requests) -> list:
        answers = [None] * len(requests)
        # Requests with the same generation settings are batched together (they share max_new_tokens).
        groups = {}
        for k, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs)
            kind = gen_kwargs.pop("granvit_task", "vqa")
            max_new_tokens = int(gen_kwargs.pop("max_new_tokens", 32))
            if kind == "grounding":  # the box format decides, as in granvit-eval: one box and its eos
                max_new_tokens = grounding_budget(self.processor)
            key = (kind, max_new_tokens, tuple(gen_kwargs.pop("until", None) or ()))
            image = to_pil(doc_to_visual(self.task_dict[task][split][doc_id]))   # several images are tiled
            # lmms-eval contexts carry their task's own answer instruction.
            prompt = build_prompt(self.processor, self._sample(kind, context, image), kind, instruction=False)
            groups.setdefault(key, []).append((k, prompt, image))
        bar = tqdm(total=len(requests), desc="granvit")
        for (kind, max_new_tokens, until), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                images = [im for _, _, im in batch]
                grammar = box_grammar(self.model, self.processor) if kind == "grounding" else None
                ids = generate(self.model, self.processor, images, [p for _, p, _ in batch], max_new_tokens, grammar)
                texts = self.processor.batch_decode(ids, skip_special_tokens=True)
                if kind == "grounding":
                    boxes = self.processor.post_process_grounding(texts, [im.size for im in images])
                    texts = [json.dumps([round(v, 2) for v in b[0]]) if b else "" for b in boxes]
                for (k, _, _), text in zip(batch, texts):
                    for stop in until:
                        text = text.split(stop)[0]
                    answers[k] = text.strip()
                bar.update(len(batch))
        bar.close()
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list:
        """(sum log p(continuation | image, context), whether greedy decoding would produce it) per request."""
        results = []
        for req in tqdm(requests, desc="granvit loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            image = to_pil(doc_to_visual(self.task_dict[task][split][doc_id]))
            prompt = build_prompt(self.processor, self._sample("vqa", context, image), "vqa", instruction=False)
            inputs = self.processor(images=[image], text=[prompt],
                                    targets=[self.processor.plain_text(continuation)], return_tensors="pt")
            inputs = inputs.to(self.model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            labels = inputs.pop("labels")[0]
            logits = self.model(**inputs).logits[0].float()               # (seq, vocab)
            # Position t predicts token t + 1; the appended eos is not part of the continuation.
            positions = (labels != -100).nonzero().squeeze(1)[:-1]
            logprobs = torch.log_softmax(logits[positions - 1], dim=-1)   # (n_continuation, vocab)
            targets = labels[positions]
            total = logprobs.gather(1, targets[:, None]).sum().item()
            results.append((total, bool((logprobs.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("GranViT answers single-turn prompts; multi-round lmms-eval tasks are not supported")


def write_tasks(data: str, out_dir: str) -> str:
    """A lmms-eval task folder (granvit_grounding, granvit_regcap) reading `data` (Parquet: image, bbox, caption)."""
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(TASKS_DIR, "utils.py"), os.path.join(out_dir, "utils.py"))
    for name in ("granvit_grounding.yaml", "granvit_regcap.yaml"):
        with open(os.path.join(TASKS_DIR, name), encoding="utf-8") as f:
            text = f.read().replace("__DATA_FILE__", os.path.abspath(data))
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return out_dir


def export_regions(gran_dataset, path: str, limit: int | None = None) -> str:
    """Flatten a Gran-schema dataset to the task Parquet: one (image, bbox, caption) row per region."""
    rows = []
    for row in gran_dataset:
        for region in row["regions"]:
            rows.append({"image": row["image"], "bbox": [float(v) for v in region["bbox"]], "caption": region["caption"]})
    rows = rows[:limit] if limit else rows
    features = Features({"image": Image(), "bbox": List(Value("float32"), length=4), "caption": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write GranViT's local lmms-eval region tasks for a Parquet file")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tasks")
    make.add_argument("--data", required=True, help="Parquet with image, bbox [x1, y1, x2, y2] pixels, caption")
    make.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(write_tasks(args.data, args.out))


if __name__ == "__main__":
    main()
