"""`evaluate` module for grounding: ACC@IoU, the ACC@[0.5:0.95] sweep and mean IoU.

    import evaluate
    metric = evaluate.load("path/to/eval/evaluate_metrics/granvit_region_iou")
    metric.compute(predictions=[[0, 0, 10, 10], []], references=[[0, 0, 10, 10], [0, 0, 5, 5]])
    # {'acc@0.5': 0.5, 'acc@0.5:0.95': 0.5, 'miou': 0.5, 'invalid': 1, 'count': 2}

Boxes are [x1, y1, x2, y2] pixels; an empty or inverted prediction is a miss and is counted in "invalid".
"""
import datasets
import evaluate
from granvit.eval.metrics import grounding_scores


class GranViTRegionIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Referring-expression grounding: ACC@IoU, ACC@[0.5:0.95] and mean IoU.",
            citation="",
            inputs_description="predictions / references: [x1, y1, x2, y2] boxes in pixels ([] = no box).",
            features=datasets.Features({
                # No fixed length: an empty or malformed prediction must reach the metric to count as a miss.
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
        )

    def _compute(self, predictions, references, thresholds=(0.5,)):
        return grounding_scores(predictions, references, thresholds=tuple(thresholds))
