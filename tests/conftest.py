"""Shared fixtures: every test runs offline with a private HF_HOME, on tiny models built here."""

import atexit
import os
import shutil
import tempfile

# Set before transformers / huggingface_hub are imported by any test module: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="granvit-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # a test session leaves nothing in the temp folder
os.environ["HF_HOME"] = _HF_HOME
os.environ["GRANVIT_CACHE"] = os.path.join(_HF_HOME, "granvit-cache")  # the embedded parts tests pretrain
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


BOX_FORMATS = ("text", "tokens")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``get(box_format)``: an untrained tiny GranViT checkpoint folder (64 px, 16 image tokens, 100 coordinate bins)
    in that box format, built once per format."""
    from granvit.train.tiny import build_tiny_checkpoint

    built = {}

    def get(box_format: str = "tokens"):
        if box_format not in built:
            built[box_format] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{box_format}"), box_format=box_format)
        return built[box_format]

    return get


def load_tiny(checkpoint):
    from granvit import GranViTForConditionalGeneration, GranViTProcessor

    return GranViTForConditionalGeneration.from_pretrained(checkpoint).eval(), GranViTProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The default box format's tiny checkpoint. Modules that must hold for every box format override this fixture
    (and ``tiny_model_and_processor``) with ``every_box_format`` below."""
    return tiny_checkpoints("tokens")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_checkpoint):
    return load_tiny(tiny_checkpoint)


def every_box_format():
    """Module-level overrides of the two tiny fixtures, parametrized over the box formats:
    ``tiny_checkpoint, tiny_model_and_processor = every_box_format()`` runs the module's tests once per format."""

    @pytest.fixture(scope="module", params=BOX_FORMATS)
    def tiny_checkpoint(request, tiny_checkpoints):
        return tiny_checkpoints(request.param)

    @pytest.fixture(scope="module")
    def tiny_model_and_processor(tiny_checkpoint):
        return load_tiny(tiny_checkpoint)

    return tiny_checkpoint, tiny_model_and_processor
