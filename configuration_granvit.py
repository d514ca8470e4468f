"""GranViT configuration: a vision tower + a causal LLM + the glue between them (LLaVA-style composition)."""

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


class GranViTConfig(PreTrainedConfig):
    r"""
    Configuration of a GranViT model: ``vision_config`` (any SigLIP / SigLIP 2 / CLIP vision config) feeds a
    Linear-act-Linear projector whose outputs replace the ``<image>`` tokens of a causal LLM (``text_config``).

    Glue fields:
        image_token_id: id of the ``<image>`` placeholder (the processor expands it to ``num_image_tokens``).
        box_format: how boxes are written (processing_granvit.py): ``"text"``, the paper's normalized integers
            ``[x1, y1, x2, y2]`` in the LLM's own digits, or ``"tokens"``, ``<box><coord_a>..<coord_d></box>`` with
            new vocabulary rows. Chosen at build time.
        box_start_token_id / box_end_token_id: ids of ``<box>`` / ``</box>`` (``"tokens"`` format only).
        coord_token_start_id: id of ``<coord_0>``; ``<coord_i>`` is ``coord_token_start_id + i`` (contiguous;
            ``"tokens"`` format only).
        num_coord_bins: N, quantization bins per coordinate: integers 0 .. N-1 (text) or ``<coord_0>`` ..
            ``<coord_{N-1}>`` (tokens).
        spatial_merge_size: k; k x k neighbouring patches are concatenated before the projector, which cuts the
            image tokens by k**2 (1 = off).
        vision_feature_layer: which ViT hidden state feeds the projector (and the region features).
        projector_hidden_act: activation between the two projector layers.
        max_tiles: high-resolution tiling (tiling_granvit.py): 0 = off (one padded square view per image); N >= 1 =
            a global thumbnail plus up to N tiles of the model resolution on the grid that best fits the image's
            aspect ratio. Fixed at build time so a checkpoint always preprocesses the way it was trained; the model
            refuses ``pixel_values`` without the processor's ``image_grids`` when it is on.
        trained_tasks: the tasks this checkpoint was trained on (``bbox2caption``, ``caption2bbox``, ``vqa``, ...),
            written by the training runner; ``None`` = unknown (a fresh build). The Space uses it to say plainly
            when a tab asks for something the model never learned.
    """

    model_type = "granvit"
    sub_configs_defaults = {
        # The pooling head of SigLIP is unused by a patch-feature encoder; without `vision_use_head=False` it is built
        # and trained for nothing.
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={"vision_use_head": False, "image_size": 512, "patch_size": 16},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    box_format: str = "tokens"
    box_start_token_id: int | None = None
    box_end_token_id: int | None = None
    coord_token_start_id: int | None = None
    num_coord_bins: int = 1000
    spatial_merge_size: int = 1
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    max_tiles: int = 0
    tie_word_embeddings: bool = False
    trained_tasks: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # transformers 5 ties embeddings from the *top-level* flag only; LLMs record it in their own config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.box_format not in ("text", "tokens"):
            raise ValueError(f"box_format must be 'text' or 'tokens', got {self.box_format!r}")
        if not isinstance(self.max_tiles, int) or self.max_tiles < 0:
            raise ValueError(f"max_tiles must be an integer >= 0 (0 = no tiling), got {self.max_tiles!r}")
        if self.patch_grid_size % self.spatial_merge_size:
            raise ValueError(
                f"spatial_merge_size={self.spatial_merge_size} must divide the patch grid "
                f"({self.vision_config.image_size}px / {self.vision_config.patch_size}px = {self.patch_grid_size})"
            )

    @property
    def patch_grid_size(self) -> int:
        """Patches per side of the (square) ViT input."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per view (one view per image without tiling), after the k x k spatial merge."""
        return (self.patch_grid_size // self.spatial_merge_size) ** 2


__all__ = ["GranViTConfig"]
