"""GranViT image processor: any PIL image -> RGB, EXIF-upright, longest side resized, padded to a square.

The paper pads to keep the aspect ratio instead of squashing. Images are pasted at the top-left of the square, so the
transform between original pixels and model space is one scale per axis and nothing else; ``to_model_space`` applies it
to boxes (the region-features API and the stage-1 distillation need boxes in the model frame).

With ``max_tiles`` > 0 each image becomes a global thumbnail (that padded square) plus tiles on the best-fitting grid
(tiling_granvit.py): ``pixel_values`` holds every view of every image, ``image_grids`` the (rows, cols) of each image,
and the model frame of boxes is the stitched tile map, which covers exactly the original image.
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .tiling_granvit import cut_tiles, num_views, select_tile_grid

# Default pixel cap: PIL's own decompression-bomb threshold (~89.5 MP, a 9459 x 9459 image).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit and float scaled, alpha composited on white, EXIF applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit data fills 0..65535; float images are either 0..1 or already 0..255.
        top = 65535.0 if image.mode.startswith("I") and array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


class GranViTImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 512,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_tiles: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_image_pixels = int(max_image_pixels)
        self.max_tiles = int(max_tiles)  # 0 = no tiling; see tiling_granvit.py

    # ---- geometry -------------------------------------------------------------------------------------------------
    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the image inside the square after the longest side is resized to ``image_size``."""
        width, height = image_size
        scale = self.image_size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def _model_space_scale(self, image_size: tuple[int, int]) -> torch.Tensor:
        """Per-coordinate factor from original pixels to the region-feature frame: the padded square without tiling,
        the stitched tile map (= the original image, normalized) with tiling."""
        width, height = image_size
        if self.max_tiles:
            return torch.tensor([1 / width, 1 / height] * 2)
        new_w, new_h = self.resized_size(image_size)
        return torch.tensor([new_w / width, new_h / height] * 2) / self.image_size

    def to_model_space(self, boxes, image_size: tuple[int, int]) -> torch.Tensor:
        """Boxes ``[x1, y1, x2, y2]`` in original pixels -> normalized [0, 1] coordinates of the frame that
        ``get_region_features`` samples (the padded square; with tiling, the stitched tile map)."""
        return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * self._model_space_scale(image_size)

    def from_model_space(self, boxes, image_size: tuple[int, int]) -> torch.Tensor:
        """Inverse of ``to_model_space``."""
        return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) / self._model_space_scale(image_size)

    # ---- pixels ---------------------------------------------------------------------------------------------------
    def load(self, image) -> Image.Image:
        """Open (if a path), check the pixel cap *before* decoding, and convert to RGB."""
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            try:
                image = Image.open(image)  # reads the header only; pixels are decoded later
            except Image.DecompressionBombError as err:
                raise ValueError(f"{err} (max_image_pixels={self.max_image_pixels})") from None
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif isinstance(image, torch.Tensor):
            array = image.detach().cpu()
            array = array.permute(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3, 4) else array
            if array.is_floating_point():
                array = (array.clamp(0, 1) * 255).round()
            image = Image.fromarray(array.squeeze(-1).to(torch.uint8).numpy())
        if not isinstance(image, Image.Image):
            raise TypeError(f"Unsupported image type {type(image).__name__}; pass a PIL image, path, array or tensor")
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise ValueError(
                f"Image of {width}x{height} = {width * height} pixels exceeds max_image_pixels={self.max_image_pixels}; "
                "downscale it first or raise the limit (GranViTImageProcessor(max_image_pixels=...))"
            )
        if width < 1 or height < 1:
            raise ValueError(f"Image has an empty size {width}x{height}")
        return to_rgb(image)

    def pad_to_square(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float tensor in [0, 1]: resized content at the top-left, the mean colour elsewhere (0 once normalized)."""
        new_w, new_h = self.resized_size(image.size)
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        content = self.to_tensor(resized)
        canvas = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1).repeat(1, self.image_size, self.image_size)
        canvas[:, :new_h, :new_w] = content
        return canvas

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, h, w) float tensor in [0, 1]."""
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    def views(self, image: Image.Image, max_tiles: int) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
        """The (3, S, S) views of one RGB image in [0, 1] and its tile grid (None without tiling)."""
        if not max_tiles:
            return [self.pad_to_square(image)], None
        grid = select_tile_grid(image.size, max_tiles, self.image_size)
        tiles = [self.to_tensor(tile) for tile in cut_tiles(image, grid, self.image_size)]
        return ([self.pad_to_square(image)] if num_views(grid) > 1 else []) + tiles, grid

    def preprocess(self, images, return_tensors: str | None = "pt", max_tiles: int | None = None, **kwargs) -> BatchFeature:
        """Images (one or a list) -> ``pixel_values`` (views, 3, S, S) and ``image_sizes`` [(width, height), ...].

        Without tiling there is one view per image; with it (``max_tiles``, default the processor's own), each image
        gives its thumbnail and tiles in a row, and ``image_grids`` (images, 2) holds each image's (rows, cols).
        ``max_tiles=0`` turns tiling off for one call (the stage-1 teacher's crops are single squares).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        max_tiles = self.max_tiles if max_tiles is None else int(max_tiles)
        images = [self.load(image) for image in images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        views, grids = [], []
        for image in images:
            image_views, grid = self.views(image, max_tiles)
            views += [(view - mean) / std for view in image_views]
            grids.append(grid)
        data = {"pixel_values": torch.stack(views), "image_sizes": [image.size for image in images]}
        if max_tiles:
            data["image_grids"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)  # (images, 2): rows, cols
        return BatchFeature(data=data, tensor_type=None)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["GranViTImageProcessor", "to_rgb"]
