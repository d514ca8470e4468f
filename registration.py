"""Native ``Auto*`` registration and the ``auto_map`` every GranViT checkpoint carries."""
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_granvit import GranViTConfig
from .image_processing_granvit import GranViTImageProcessor
from .modeling_granvit import GranViTForConditionalGeneration, GranViTModel, GranViTPreTrainedModel
from .pipeline_granvit import GranViTRegionsPipeline
from .processing_granvit import GranViTProcessor

# Every Auto class a checkpoint must answer to (register_for_auto_class keeps only the last one per class, so the
# config's auto_map is written in full by the builder: see train/build.py).
AUTO_MAP = {
    "AutoConfig": "configuration_granvit.GranViTConfig",
    "AutoModel": "modeling_granvit.GranViTModel",
    "AutoModelForImageTextToText": "modeling_granvit.GranViTForConditionalGeneration",
}

# The pipelines a checkpoint offers, by task: `pipeline(task, model=..., trust_remote_code=True)` reads this from
# config.custom_pipelines and loads the class from the checkpoint's own pipeline_granvit.py.
CUSTOM_PIPELINES = {
    "granvit-regions": {
        "impl": "pipeline_granvit.GranViTRegionsPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    },
}

GranViTConfig.register_for_auto_class()
GranViTModel.register_for_auto_class("AutoModel")
GranViTForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
GranViTImageProcessor.register_for_auto_class("AutoImageProcessor")
GranViTProcessor.register_for_auto_class("AutoProcessor")

AutoConfig.register("granvit", GranViTConfig, exist_ok=True)
AutoModel.register(GranViTConfig, GranViTModel, exist_ok=True)
AutoModelForImageTextToText.register(GranViTConfig, GranViTForConditionalGeneration, exist_ok=True)
# One class for both of transformers' backends (it resizes and pads with PIL, then converts to torch): under "pil" only,
# AutoImageProcessor asked for its default "torchvision" first and warned at every load that it fell back.
AutoImageProcessor.register(GranViTConfig, image_processor_classes={"pil": GranViTImageProcessor,
                                                                    "torchvision": GranViTImageProcessor}, exist_ok=True)
AutoProcessor.register(GranViTConfig, GranViTProcessor, exist_ok=True)
# In memory, with this package imported: pipeline("granvit-regions", model=model, processor=processor).
PIPELINE_REGISTRY.register_pipeline(
    "granvit-regions", pipeline_class=GranViTRegionsPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
)

__all__ = [
    "AUTO_MAP",
    "CUSTOM_PIPELINES",
    "GranViTConfig",
    "GranViTImageProcessor",
    "GranViTModel",
    "GranViTForConditionalGeneration",
    "GranViTPreTrainedModel",
    "GranViTProcessor",
    "GranViTRegionsPipeline",
]
