"""GranViT: a ViT trained *through* an LLM so that its patch features localize meaning (arXiv 2510.21501).

Layout follows transformers' LLaVA so PEFT targets, freezing code and other people's scripts read the same:
``GranViTForConditionalGeneration.model = GranViTModel(vision_tower, multi_modal_projector, language_model)`` + ``lm_head``.
Both backbones are composed with ``AutoModel.from_config``, so any SigLIP / SigLIP 2 / CLIP tower and any causal LLM
plug in, and the trained tower can be saved as a plain checkpoint of its own architecture.
"""

import math

import torch
from torch import nn
from torchvision.ops import roi_align
from transformers import AutoModel, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)

from .configuration_granvit import GranViTConfig
from .region_decoding_granvit import GranViTRegionDecodingMixin  # dense region APIs (describe_regions, ground)
from .tiling_granvit import check_image_grids, num_views, stitch_tiles


def coordinate_code(num_bins: int, dim: int) -> torch.Tensor:
    """(num_bins, dim) sin/cos code of the bin value: the starting rows of ``<coord_*>`` tokens, so neighbouring bins
    start similar. From one cycle over the whole range (coarse position) to one cycle per 8 bins (fine position)."""
    position = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1) / num_bins  # (n, 1) in [0, 1)
    freqs = torch.exp(torch.linspace(0.0, math.log(max(num_bins / 8, 1.0)), (dim + 1) // 2)).unsqueeze(0)
    angles = 2 * math.pi * position * freqs  # (n, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[:, :dim]


class GranViTPreTrainedModel(PreTrainedModel):
    config_class = GranViTConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @staticmethod
    def inference_dtype(device: str | torch.device) -> torch.dtype:
        """The dtype to run inference in on ``device``: bf16 on accelerators and on CPUs with bf16 matrix units (AMX,
        AVX512-BF16), where bf16 weights keep the held-out scores and run faster (BENCHMARKS.md); fp32 on other CPUs,
        where bf16 matmuls are emulated and slow. Training precision is the recipe's business, not this."""
        if torch.device(device).type != "cpu":
            return torch.bfloat16
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = f.read()
        except OSError:  # not Linux: no cheap way to tell, stay exact
            return torch.float32
        return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


class GranViTMultiModalProjector(nn.Module):
    """Linear -> act -> Linear from (merged) ViT patch features to LLM embeddings."""

    def __init__(self, config: GranViTConfig):
        super().__init__()
        in_features = config.vision_config.hidden_size * config.spatial_merge_size**2
        self.linear_1 = nn.Linear(in_features, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class GranViTModel(GranViTPreTrainedModel):
    def __init__(self, config: GranViTConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = GranViTMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_patch_features(self, pixel_values: torch.Tensor, vision_tower: nn.Module | None = None) -> torch.Tensor:
        """ViT patch features of the square model input: (batch, grid, grid, vision_hidden).

        ``vision_tower`` lets a caller run another tower of the same architecture (the stage-1 EMA teacher).
        """
        tower = self.vision_tower if vision_tower is None else vision_tower
        pixel_values = pixel_values.to(dtype=next(tower.parameters()).dtype)
        out = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        features = out.hidden_states[self.config.vision_feature_layer]  # (batch, tokens, hidden)
        grid = pixel_values.shape[-1] // self.config.vision_config.patch_size
        if features.shape[1] == grid * grid + 1:  # CLIP prepends a CLS token; the grid is what localizes
            features = features[:, 1:]
        return features.reshape(features.shape[0], grid, grid, features.shape[-1])

    def merge_patches(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Concatenate k x k neighbouring patches (as in Qwen2-VL's PatchMerger): (b, g, g, d) -> (b, (g/k)^2, k*k*d)."""
        k = self.config.spatial_merge_size
        b, g, _, d = patch_features.shape
        x = patch_features.reshape(b, g // k, k, g // k, k, d)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (g // k) ** 2, k * k * d)

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grids: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """``last_hidden_state``: ViT patch features of every view (views, g*g, d); ``pooler_output``: per image its
        projected image tokens (views of the image x ``num_image_tokens``, text_hidden). Without tiling a view is an
        image; with it (``image_grids``: (images, 2) rows, cols) an image is its thumbnail and tiles in a row."""
        check_image_grids(pixel_values.shape[0], image_grids, self.config.max_tiles)
        patches = self.get_patch_features(pixel_values)  # (views, g, g, d)
        projected = self.multi_modal_projector(self.merge_patches(patches))  # (views, num_image_tokens, text_hidden)
        if image_grids is None:
            per_image = list(projected.unbind(0))
        else:
            per_image = [p.flatten(0, 1) for p in projected.split([num_views(g) for g in image_grids.tolist()])]
        return BaseModelOutputWithPooling(last_hidden_state=patches.flatten(1, 2), pooler_output=per_image)

    def get_feature_maps(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """One ViT feature map per image, (H, W, vision_hidden): the patch grid of the padded square, or with tiling
        the stitched tile map (tiles put back on one grid, the thumbnail left out), which covers the original image.
        ``patch_features``: precomputed ``get_patch_features`` output (views, g, g, d), to avoid encoding twice; without
        ``image_grids`` each of its views is one map (the stage-1 teacher's crops are single squares)."""
        if patch_features is None:
            check_image_grids(pixel_values.shape[0], image_grids, self.config.max_tiles)
            patch_features = self.get_patch_features(pixel_values)
        if image_grids is None:
            return list(patch_features.unbind(0))
        return stitch_tiles(patch_features, image_grids)

    def get_region_features(
        self,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | torch.Tensor | None = None,
        output_size: int | tuple[int, int] = 7,
        patch_features: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ROIAlign over the ViT feature map of each image: one (vision_hidden, out, out) feature map per box.

        Args:
            pixel_values: (views, 3, S, S) model inputs (ignored if ``patch_features`` is given).
            boxes: one (K_i, 4) tensor per image, ``[x1, y1, x2, y2]`` normalized to the image's feature map frame
                (``processor.image_processor.to_model_space`` converts from original pixels: the padded square, or
                with tiling the original image, which the stitched tile map covers), or one (K, 5) tensor
                ``[image_index, x1, y1, x2, y2]``.
            output_size: ROI output resolution.
            patch_features: precomputed ``get_patch_features`` output (views, g, g, d), to avoid encoding twice.
            image_grids: (images, 2) the tile grids the processor returned (tiling checkpoints only).
        Returns:
            (sum K_i, vision_hidden, out_h, out_w)
        """
        maps = self.get_feature_maps(pixel_values, image_grids, patch_features)  # per image (H, W, d)
        order = None
        if not isinstance(boxes, (list, tuple)):  # (K, 5): group by image, then restore the given order
            index = boxes[:, 0].long()
            order = torch.cat([(index == i).nonzero().squeeze(1) for i in range(len(maps))])
            boxes = [boxes[index == i, 1:] for i in range(len(maps))]
        if len(boxes) != len(maps):
            raise ValueError(f"boxes for {len(boxes)} image(s) but {len(maps)} image(s) in the input")
        outputs = []
        for feature_map, image_boxes in zip(maps, boxes):
            height, width = feature_map.shape[:2]
            feature_map = feature_map.permute(2, 0, 1).unsqueeze(0)  # (1, d, H, W)
            rois = image_boxes.to(feature_map).reshape(-1, 4) * feature_map.new_tensor([width, height, width, height])
            dtype = feature_map.dtype
            if feature_map.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
                # torchvision's CPU roi_align kernel has no half-precision version.
                feature_map, rois = feature_map.float(), rois.float()
            # aligned=True: a box [0, 0, 1, 1] covers exactly the whole map (patch i spans [i, i+1)).
            outputs.append(roi_align(feature_map, [rois], output_size=output_size, spatial_scale=1.0, aligned=True).to(dtype))
        features = torch.cat(outputs)
        if order is not None:
            features = features[torch.argsort(order)]
        return features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        image_grids: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grids)
        if image_outputs is not None:
            image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds)
            if input_ids is None:
                raise ValueError("Images need input_ids: the <image> placeholders mark where image features go")
            image_mask = input_ids == self.config.image_token_id  # (b, seq)
            n_tokens, n_features = int(image_mask.sum()), image_features.shape[0]
            if n_tokens != n_features:
                raise ValueError(
                    f"Image features and image tokens do not match: {n_tokens} <image> tokens in input_ids but "
                    f"{len(image_outputs.pooler_output)} image(s) with {n_features} features "
                    f"({self.config.num_image_tokens} per view, config.max_tiles={self.config.max_tiles}). Build inputs "
                    "with GranViTProcessor, which expands each <image> to the right count."
                )
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class GranViTForConditionalGeneration(GranViTPreTrainedModel, GenerationMixin, GranViTRegionDecodingMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: GranViTConfig):
        super().__init__(config)
        self.model = GranViTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_region_features(
        self, pixel_values=None, boxes=None, output_size=7, patch_features=None, image_grids=None
    ) -> torch.Tensor:
        """See ``GranViTModel.get_region_features``: ROIAlign region embeddings from the ViT feature map."""
        return self.model.get_region_features(pixel_values, boxes, output_size, patch_features, image_grids)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        image_grids: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        if cache is None and "past_key_values" in kwargs:  # 4.x callers
            cache = kwargs.pop("past_key_values")
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            image_grids=image_grids,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # Unshifted labels with -100 on ignored positions; the loss function shifts, and divides by
            # `num_items_in_batch` when the Trainer passes it (correct under gradient accumulation and DDP).
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def generate(self, *args, constrain_boxes: bool = True, **kwargs):
        """``GenerationMixin.generate``, with grounding requests decoded under the box grammar.

        A row whose prompt is a grounding request (the checkpoint's Caption2Bbox template around a caption, whether
        written by ``caption2bbox_prompt``, as plain text or as chat messages: processing_granvit.py) gets the box
        grammar of the checkpoint's box format, so its answer always holds a well-formed box, or "not found" for a
        checkpoint trained with negatives; every other row decodes as usual. This is how
        ``pipeline("image-text-to-text")`` grounds. It needs ``generation_config.granvit_grounding``
        (``configure_grounding``, written when a checkpoint is saved). ``constrain_boxes=False`` turns it off."""
        grammar = self.request_grammar(kwargs.get("generation_config")) if constrain_boxes else None
        if grammar is not None:
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), grammar])
        return super().generate(*args, **kwargs)

    @torch.no_grad()
    def initialize_coordinate_embeddings(self) -> None:
        """Give ``<coord_0..n-1>`` sin/cos embeddings of their bin value, so neighbouring bins start similar.

        Mean-resizing (the transformers default for new tokens) makes every new row the same noisy average, which
        tells the LLM nothing about order; a smooth code in the bin value does. Rows are scaled to the mean norm of
        the existing embeddings so they sit in the same range. ``lm_head`` rows get the same code (tied or not).
        """
        start, n = self.config.coord_token_start_id, self.config.num_coord_bins
        if self.config.box_format != "tokens" or start is None:
            raise ValueError("coordinate-token embeddings exist only with box_format='tokens' and its tokens added")
        embeddings = self.get_input_embeddings().weight
        code = coordinate_code(n, embeddings.shape[1])  # (n, dim)
        reference = torch.cat([embeddings[:start], embeddings[start + n :]]).float()
        scale = reference.norm(dim=1).mean() / code.norm(dim=1).mean()
        embeddings[start : start + n] = (code * scale).to(embeddings)
        output = self.get_output_embeddings().weight
        if output.data_ptr() != embeddings.data_ptr():
            output[start : start + n] = (code * scale).to(output)


__all__ = ["GranViTPreTrainedModel", "GranViTModel", "GranViTForConditionalGeneration", "GranViTMultiModalProjector"]
