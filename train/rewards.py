"""Rewards for grounding by reinforcement learning (the `grpo` stage, train/trl_stages.py), as trl reward functions.

trl calls a reward function with `prompts`, `completions` and every other dataset column as keyword lists, one entry
per completion; these read `box` (the true ``[x1, y1, x2, y2]`` in original pixels) and `image_size` (``[w, h]``).
A completion is decoded with `processor.decode_boxes`, so both box formats are scored the same way, and its *first*
box is the answer, as `granvit-eval` scores grounding (eval/run.py).
"""

from __future__ import annotations

from ..eval.metrics import box_iou, valid_box


def completion_text(completion) -> str:
    """The text of a completion: a string, or trl's conversational form ``[{"role": "assistant", "content": text}]``."""
    return completion[0]["content"] if isinstance(completion, list) else completion


class _BoxReward:
    def __init__(self, processor, name: str):
        self.processor = processor
        self.__name__ = name  # trl logs each reward as rewards/<__name__>

    def first_box(self, completion, image_size) -> list[float] | None:
        boxes = self.processor.decode_boxes(completion_text(completion), tuple(image_size))
        return boxes[0] if boxes and valid_box(boxes[0]) else None


class BoxIoUReward(_BoxReward):
    """IoU of the answer's box with the true box (eval/metrics.py's `box_iou`), 0 when there is no valid box: the
    quantity that ACC@0.5 thresholds and mIoU averages. Unlike cross-entropy on coordinate tokens it knows that bin 41
    is closer to 42 than to 900."""

    def __init__(self, processor):
        super().__init__(processor, "iou")

    def __call__(self, prompts, completions, box, image_size, **kwargs) -> list[float]:
        rewards = []
        for completion, truth, size in zip(completions, box, image_size, strict=True):
            predicted = self.first_box(completion, size)
            rewards.append(0.0 if predicted is None else box_iou(predicted, [float(v) for v in truth]))
        return rewards


class BoxFormatReward(_BoxReward):
    """1 when the answer holds a well-formed box, else 0: the format signal when sampling is not under the box grammar
    (with the grammar every sample has a box, and this reward would be a constant)."""

    def __init__(self, processor):
        super().__init__(processor, "box_format")

    def __call__(self, prompts, completions, image_size, **kwargs) -> list[float]:
        return [float(self.first_box(c, size) is not None) for c, size in zip(completions, image_size, strict=True)]


def grounding_rewards(processor, box_grammar: bool) -> list:
    """The GRPO stage's reward functions: IoU, plus the format reward when the grammar is off."""
    return [BoxIoUReward(processor)] if box_grammar else [BoxIoUReward(processor), BoxFormatReward(processor)]
