"""Compose a GranViT checkpoint from a pretrained vision tower and a pretrained causal LLM.

    granvit-build --vision google/siglip2-base-patch16-512 --llm Qwen/Qwen2.5-1.5B --out granvit-base
    granvit-build --vision ./tiny-siglip --llm ./tiny-qwen2 --out ./tiny-granvit --num-coord-bins 100

Any SigLIP / SigLIP 2 / CLIP checkpoint works for ``--vision`` (a full dual-encoder checkpoint or a vision-only one:
only the vision tower is kept), and any causal LLM with a tokenizer for ``--llm``. The output folder is a complete
``trust_remote_code`` checkpoint: safetensors weights, config with ``auto_map``, processor + tokenizer + chat template,
generation config and the Hub ``.py`` files.
"""

import argparse
import contextlib
import copy
import logging
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
)
from transformers.dynamic_module_utils import custom_object_save

from ..box_codec_granvit import coord_token
from ..console import UserError, check_model_source, console_main
from ..registration import AUTO_MAP, CUSTOM_PIPELINES
from ..configuration_granvit import GranViTConfig
from ..image_processing_granvit import GranViTImageProcessor
from ..modeling_granvit import GranViTForConditionalGeneration
from ..pipeline_granvit import GranViTRegionsPipeline
from ..processing_granvit import GranViTProcessor

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def transformers_errors_only():
    """transformers logs errors only inside the block: for calls whose warnings describe what the build does on purpose
    (each use says which), not something the user should act on."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def vision_config_from(vision: str) -> PreTrainedConfig:
    """The vision part of a SigLIP / CLIP config, vision-only or dual-encoder, without the SigLIP pooling head.

    A dual encoder's config is read by its vision config class (which takes the ``vision_config`` part), never whole:
    loading a whole SigLIP config compares its text half with a default ``SiglipTextConfig``, whose CLIP token ids
    (49406) lie outside its own default vocabulary (32000), and transformers warns about that default on every load."""
    model_type = PreTrainedConfig.get_config_dict(vision)[0].get("model_type")
    config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    if config_class is None:  # not a transformers type: AutoConfig names the problem
        config = AutoConfig.from_pretrained(vision)
    else:
        config = config_class.sub_configs.get("vision_config", config_class).from_pretrained(vision)
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    return config


def image_processor_from(vision: str, image_size: int, max_tiles: int = 0) -> GranViTImageProcessor:
    """Keep the tower's own normalization (SigLIP: 0.5/0.5, CLIP: OpenAI mean/std) when it ships a preprocessor."""
    try:
        source = AutoImageProcessor.from_pretrained(vision)
        mean, std = source.image_mean, source.image_std
    except OSError:
        logger.warning("%s has no image processor config; using SigLIP's mean/std of 0.5", vision)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return GranViTImageProcessor(image_size=image_size, image_mean=mean, image_std=std, max_tiles=max_tiles)


def coordinate_bins(tokenizer, llm: str, num_coord_bins: int | None, box_format: str) -> tuple[int, bool]:
    """(bins, whether the LLM already has their tokens). An LLM trained with the ``tokens`` box format (the embedded
    LM part) fixes the bins: added bins' ids would not follow its own. ``num_coord_bins`` None: the LLM's, else
    GranViTConfig's default (1000)."""
    vocab = tokenizer.get_vocab()
    if box_format != "tokens" or coord_token(0) not in vocab:
        return num_coord_bins or GranViTConfig.num_coord_bins, False
    known = next(i for i in range(len(vocab) + 1) if coord_token(i) not in vocab)
    if num_coord_bins not in (None, known):
        raise UserError(f"--llm {llm}: its tokenizer already has {known} coordinate tokens (<coord_0>..<coord_{known - 1}>), "
                        f"so the box format 'tokens' needs num_coord_bins={known}, not {num_coord_bins}; or use "
                        "box_format='text'")
    return known, True


def load_vision_tower(vision: str, vision_config, dtype: torch.dtype):
    """The vision tower of a SigLIP / CLIP checkpoint, vision-only or dual-encoder, loaded with the tower's own class
    (a dual encoder's text half and the SigLIP pooling head stay behind). transformers reports the weights it leaves
    behind as a warning; the build leaves them on purpose, so it checks instead that no tower weight was missing."""
    with transformers_errors_only():  # the load report lists the text half and head, left behind on purpose
        tower, info = MODEL_MAPPING[type(vision_config)].from_pretrained(vision, config=vision_config, dtype=dtype,
                                                                         output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"--vision {vision}: the checkpoint lacks {len(missing)} weights of its vision tower (e.g. "
                        f"{missing[0]}); pass a SigLIP / SigLIP 2 / CLIP checkpoint")
    return tower


def build_granvit(
    vision: str,
    llm: str,
    num_coord_bins: int | None = None,
    spatial_merge_size: int = 1,
    vision_feature_layer: int = -1,
    projector_hidden_act: str = "gelu",
    box_format: str = "tokens",
    max_tiles: int = 0,
    dtype: torch.dtype = torch.float32,
    **processor_kwargs,
) -> tuple[GranViTForConditionalGeneration, GranViTProcessor]:
    """Load both parts with ``from_pretrained``, add GranViT's tokens, and return (model, processor).

    ``box_format``: ``"tokens"`` (6 tokens per box, added with sin/cos-initialised coordinate rows unless the LLM
    already has them; what the small-scale measurement chose) or ``"text"`` (the paper's: coordinates as integers in
    the LLM's own digits); see processing_granvit.py. ``num_coord_bins`` None: the LLM's own coordinate tokens'
    number if it has them, else 1000. ``max_tiles``: 0 (no tiling) or N, a global thumbnail plus up to N tiles per image
    (tiling_granvit.py), recorded in the config and the image processor.
    """
    tokenizer = AutoTokenizer.from_pretrained(llm)
    num_coord_bins, knows_boxes = coordinate_bins(tokenizer, llm, num_coord_bins, box_format)
    token_ids = GranViTProcessor.add_tokens(tokenizer, num_coord_bins, box_format)

    vision_config = vision_config_from(vision)
    text_config = AutoConfig.from_pretrained(llm)
    config = GranViTConfig(
        vision_config=vision_config,
        text_config=text_config,
        num_coord_bins=num_coord_bins,
        spatial_merge_size=spatial_merge_size,
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act=projector_hidden_act,
        box_format=box_format,
        max_tiles=max_tiles,
        **token_ids,
    )
    config.auto_map = dict(AUTO_MAP)
    config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
    model = GranViTForConditionalGeneration(config).to(dtype)

    model.model.vision_tower.load_state_dict(load_vision_tower(vision, vision_config, dtype).state_dict())
    lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    # Copy (never share) the head: sharing a tied LLM's head with an untied GranViT would drop it on save.
    model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    del lm

    with transformers_errors_only():  # transformers announces mean_resizing (the init chosen here) as a warning
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True, pad_to_multiple_of=64)
    if box_format == "tokens" and not knows_boxes:  # an LLM that already reads box tokens keeps its rows
        model.initialize_coordinate_embeddings()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    processor = GranViTProcessor(
        image_processor_from(vision, vision_config.image_size, max_tiles),
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_coord_bins=num_coord_bins,
        box_format=box_format,
        **processor_kwargs,
    )
    model.configure_grounding(processor)  # generate decodes grounding requests under the box grammar on its own
    return model, processor


def ship_pipeline(folder: str | Path) -> None:
    """Copy pipeline_granvit.py into a checkpoint folder. Its config's ``custom_pipelines`` names the file, but
    ``model.save_pretrained`` copies only the modeling file and what it imports; transformers ships a pipeline's code
    with ``custom_object_save``, as ``Pipeline.save_pretrained`` does for a registered pipeline."""
    custom_object_save(GranViTRegionsPipeline, folder)


def save_granvit(model: GranViTForConditionalGeneration, processor: GranViTProcessor, out: str | Path) -> Path:
    """Write a complete checkpoint folder (weights, config with auto_map and custom_pipelines, processor, Hub .py
    files, the pipeline's among them)."""
    out = Path(out)
    model.config.auto_map = {**dict(AUTO_MAP), **(getattr(model.config, "auto_map", None) or {})}
    pipelines = getattr(model.config, "custom_pipelines", None) or {}
    model.config.custom_pipelines = {**copy.deepcopy(CUSTOM_PIPELINES), **pipelines}
    model.configure_grounding(processor)  # after training: "not found" in the grammar if the model learned it
    model.save_pretrained(out)
    processor.save_pretrained(out)
    ship_pipeline(out)
    return out


@console_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", required=True, help="Hub id or folder of a SigLIP / SigLIP 2 / CLIP checkpoint")
    parser.add_argument("--llm", required=True, help="Hub id or folder of a causal LLM (with its tokenizer)")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--num-coord-bins", type=int, default=None,
                        help="N: coordinates are quantized to 0 .. N-1 (default: the LLM's own box tokens' bins if it "
                        "has them, as the embedded LM part does, else 1000)")
    parser.add_argument("--box-format", choices=["tokens", "text"], default="tokens",
                        help="tokens: 6 new tokens per box; text: '[x1, y1, x2, y2]' in the LLM's own digits (the paper's)")
    parser.add_argument("--spatial-merge-size", type=int, default=1, help="k: k x k patches per image token")
    parser.add_argument("--vision-feature-layer", type=int, default=-1)
    parser.add_argument("--max-tiles", type=int, default=0,
                        help="high-resolution tiling: a global view + up to N tiles per image (0 = off; 6 is typical)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, processor = build_granvit(
        check_model_source(args.vision, "--vision"),
        check_model_source(args.llm, "--llm"),
        num_coord_bins=args.num_coord_bins,
        spatial_merge_size=args.spatial_merge_size,
        vision_feature_layer=args.vision_feature_layer,
        box_format=args.box_format,
        max_tiles=args.max_tiles,
        dtype=getattr(torch, args.dtype),
    )
    out = save_granvit(model, processor, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Saved GranViT ({n_params / 1e6:.1f}M parameters, {model.config.num_image_tokens} image tokens) to {out}")


if __name__ == "__main__":
    sys.exit(main())
