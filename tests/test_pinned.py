"""Pinned numbers, transformers' `expected_slice` style: the seeded tiny checkpoint's logits for one fixed request, in
both box formats. A change to the tiny parts' initialisation, the build, the processor's prompt or the forward pass
moves them; if the change is meant, recompute the slices and say why in the commit."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tiny

# (prompt length, logits[0, -1, :6] after the fixed request, mean |logit|)
EXPECTED = {
    "tokens": (86, [-0.025742, 0.251403, 0.056340, -0.026660, -0.094215, -0.061375], 0.084511),
    "text": (96, [0.004134, 0.219057, 0.040387, -0.052836, -0.091279, -0.079357], 0.078050),
}


@pytest.mark.parametrize("box_format", sorted(EXPECTED))
def test_seeded_tiny_model_logits_are_pinned(tiny_checkpoints, box_format):
    model, processor = load_tiny(tiny_checkpoints(box_format))
    image = Image.fromarray((np.arange(64 * 64 * 3).reshape(64, 64, 3) % 251).astype("uint8"))
    inputs = processor(images=image, text=processor.bbox2caption_prompt([8, 16, 40, 56], image_size=(64, 64)),
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    length, expected_slice, mean_abs = EXPECTED[box_format]
    assert inputs["input_ids"].shape == (1, length)
    torch.testing.assert_close(logits[0, -1, :6], torch.tensor(expected_slice), atol=1e-4, rtol=0)
    assert abs(logits.abs().mean().item() - mean_abs) < 1e-4
