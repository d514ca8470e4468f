"""`evaluate` module for region captions: BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap), METEOR with Java.

    import evaluate
    metric = evaluate.load("path/to/eval/evaluate_metrics/granvit_caption")
    metric.compute(predictions=["a red car"], references=[["a red car", "red automobile"]], meteor=False)

Also returns "exact" (normalised exact match against any reference), the synthetic set's metric.
"""
import datasets
import evaluate
from granvit.eval.metrics import caption_scores, normalize_text


class GranViTCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Region captioning: COCO caption metrics and normalised exact match.",
            citation="",
            inputs_description="predictions: strings; references: per prediction a list of reference strings.",
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, meteor=None):
        out = caption_scores(predictions, references, meteor=meteor)
        out["exact"] = sum(
            normalize_text(p) in {normalize_text(r) for r in refs} for p, refs in zip(predictions, references)
        ) / len(predictions)
        return out
