"""Shared fixtures: every test runs offline with a private HF_HOME, on tiny models built here."""

import os
import tempfile

# Set before transformers / huggingface_hub are imported by any test module: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="granvit-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny GranViT checkpoint folder (64 px, 16 image tokens, 100 coordinate bins), built once."""
    from granvit.train.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_checkpoint):
    from granvit import GranViTForConditionalGeneration, GranViTProcessor

    model = GranViTForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = GranViTProcessor.from_pretrained(tiny_checkpoint)
    return model, processor
