"""Linear probe of region features: can a logistic regression read a region's shape and colour off its ROI feature?

This measures what the paper's self-distillation claims to improve (region-level, localizable ViT features) without
going through the LLM: the features are `model.get_region_features` (ROIAlign over the ViT patch grid at the region's
box), the probe is trained on regions of training images and scored on regions of held-out images.

Labels come from the synthetic captions: the generator (`train/data/synth.py`, `_describe`) writes every natural
region's caption as "[size] colour [texture] shape", with colours from `COLOURS` and shapes from `SHAPES`
(gran_format.py), and records no separate attribute fields, so the caption's words are the ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..gran_format import COLOURS, SHAPES

ATTRIBUTES = {"shape": set(SHAPES), "colour": set(COLOURS)}


def caption_attributes(caption: str) -> dict[str, str] | None:
    """{"shape": ..., "colour": ...} named by a synthetic caption, or None when it does not name exactly one of each
    (OCR text, a relational caption naming two objects)."""
    words = caption.split()
    found = {}
    for attribute, vocabulary in ATTRIBUTES.items():
        hits = [w for w in words if w in vocabulary]
        if len(hits) != 1:
            return None
        found[attribute] = hits[0]
    return found


@torch.no_grad()
def region_features(model, processor, dataset, output_size: int, max_images: int | None = None, batch_size: int = 64):
    """ROI features and attribute labels of every natural region of the first `max_images` rows of a Gran dataset.

    Returns (features (regions, vision_hidden * output_size**2) float32 numpy, {attribute: list of labels}).
    """
    was_training = model.training
    model.eval()
    ip = processor.image_processor
    n_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    features, labels = [], {a: [] for a in ATTRIBUTES}
    for start in range(0, n_images, batch_size):
        images, boxes, kept = [], [], []
        for row in dataset.select(range(start, min(start + batch_size, n_images))):
            regions = [(r, caption_attributes(r["caption"])) for r in row["regions"]]
            regions = [(r, attrs) for r, attrs in regions if attrs is not None]
            if not regions:
                continue
            image = row["image"].convert("RGB")
            images.append(image)
            boxes.append(ip.to_model_space([r["bbox"] for r, _ in regions], image.size))  # (K, 4) model frame
            kept += [attrs for _, attrs in regions]
        if not images:
            continue
        inputs = ip(images)  # with tiling: every image's thumbnail and tiles, and image_grids to stitch them back
        grids = inputs.get("image_grids")
        rois = model.get_region_features(inputs["pixel_values"].to(model.device), boxes, output_size=output_size,
                                         image_grids=None if grids is None else grids.to(model.device))
        features.append(rois.flatten(1).float().cpu().numpy())
        for attrs in kept:
            for a in ATTRIBUTES:
                labels[a].append(attrs[a])
    model.train(was_training)
    if not features:
        raise ValueError("no region with a shape and a colour in its caption: the probe needs natural synthetic scenes")
    return np.concatenate(features), labels


def linear_probe(model, processor, train, test, output_size: int, seed: int = 0) -> dict:
    """Held-out accuracy of a logistic regression per attribute, next to the majority-class accuracy.

    train, test: Gran `datasets.Dataset`s; the probe is fit on every region of `train` (training-split images)
    and scored on every region of `test` (held-out images).
    """
    x_train, y_train = region_features(model, processor, train, output_size)
    x_test, y_test = region_features(model, processor, test, output_size)
    scores = {"probe_train_regions": len(x_train), "probe_test_regions": len(x_test)}
    for attribute in ATTRIBUTES:
        # Standardize first: ViT features of different layers/runs differ in scale, and lbfgs converges on unit scale.
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
        # One BLAS thread: on a few shared cores a threaded fit of this small problem thrashed (28 s vs 0.6 s measured).
        with threadpool_limits(1):
            probe.fit(x_train, y_train[attribute])
        scores[f"probe_{attribute}_acc"] = float(probe.score(x_test, y_test[attribute]))
        values, counts = np.unique(y_train[attribute], return_counts=True)
        majority = values[counts.argmax()]
        scores[f"probe_{attribute}_majority"] = float(np.mean(np.asarray(y_test[attribute]) == majority))
    return scores
