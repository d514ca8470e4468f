"""GranViT image processor: any PIL image -> RGB, EXIF-upright, longest side resized, padded to a square.

The paper pads to keep the aspect ratio instead of squashing. Images are pasted at the top-left of the square, so the
transform between original pixels and model space is one scale per axis and nothing else; ``to_model_space`` applies it
to boxes (the region-features API and the stage-1 distillation need boxes in the model frame).
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_image_pixels = int(max_image_pixels)

    # ---- geometry -------------------------------------------------------------------------------------------------
    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the image inside the square after the longest side is resized to ``image_size``."""
        width, height = image_size
        scale = self.image_size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def to_model_space(self, boxes, image_size: tuple[int, int]) -> torch.Tensor:
        """Boxes ``[x1, y1, x2, y2]`` in original pixels -> normalized [0, 1] coordinates of the padded square."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        width, height = image_size
        new_w, new_h = self.resized_size(image_size)
        scale = torch.tensor([new_w / width, new_h / height] * 2) / self.image_size
        return boxes * scale

    def from_model_space(self, boxes, image_size: tuple[int, int]) -> torch.Tensor:
        """Inverse of ``to_model_space``."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        width, height = image_size
        new_w, new_h = self.resized_size(image_size)
        return boxes * self.image_size / torch.tensor([new_w / width, new_h / height] * 2)

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
        content = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        canvas = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1).repeat(1, self.image_size, self.image_size)
        canvas[:, :new_h, :new_w] = content
        return canvas

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (one or a list) -> ``pixel_values`` (batch, 3, S, S) and ``image_sizes`` [(width, height), ...]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        images = [self.load(image) for image in images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        pixel_values = torch.stack([(self.pad_to_square(image) - mean) / std for image in images])
        data = {"pixel_values": pixel_values, "image_sizes": [image.size for image in images]}
        return BatchFeature(data=data, tensor_type=None)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["GranViTImageProcessor", "to_rgb"]
