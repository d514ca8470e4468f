"""`granvit-export-encoder`: the trained GranViT ViT as a plain checkpoint of its own architecture.

    granvit-export-encoder outputs/quickstart/checkpoint granvit-vit
    python -c "from transformers import AutoModel; print(AutoModel.from_pretrained('granvit-vit'))"   # no remote code

The output folder holds the vision tower exactly as GranViT trained it (e.g. a ``SiglipVisionModel`` with the
checkpoint's ``vision_config``), a stock image processor config with GranViT's normalization and resolution, and a
README. Any LLaVA-style stack that takes a SigLIP / CLIP tower can load it with stock transformers.

Two things a user must know, written into the README too:
- GranViT resizes the longest side and pads to a square (top-left, mean colour); the stock processor squashes
  non-square images instead. Pad first (the README shows how) to give the encoder what it was trained on.
- GranViT reads ``hidden_states[vision_feature_layer]``; layers after it got no training signal and are dropped
  here, so ``hidden_states[-1]`` of the export is GranViT's patch feature. ``last_hidden_state`` adds the tower's
  ``post_layernorm`` (kept from the pretrained tower; GranViT does not use it).
- A checkpoint trained with tiling (``config.max_tiles`` > 0) saw a thumbnail plus tiles per image; the export then
  carries ``tiling_granvit.py`` (torch + PIL only) and its README shows how to tile and stitch with it.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from transformers import AutoModel, SiglipImageProcessor
from transformers.image_utils import PILImageResampling

from ..configuration_granvit import GranViTConfig
from ..console import UserError, console_main

PREFIX = "vision_tower."

README = """---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [granvit, vision-encoder, {model_type}]
---

# GranViT vision encoder ({architecture})

The ViT of a GranViT checkpoint (arXiv 2510.21501), exported as a plain `{architecture}`: it loads with stock
transformers, no `trust_remote_code`. {size} px input, {grid} x {grid} patches of {patch} px, hidden size {hidden}.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

encoder = AutoModel.from_pretrained("{name}")
processor = AutoImageProcessor.from_pretrained("{name}")

image = Image.open("street.jpg").convert("RGB")
# GranViT was trained on images padded to a square (content at the top-left, the rest the mean colour).
side = max(image.size)
square = Image.new("RGB", (side, side), tuple(round(255 * m) for m in processor.image_mean))
square.paste(image, (0, 0))
pixel_values = processor(images=square, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    out = encoder(pixel_values=pixel_values, output_hidden_states=True)
patch_features = out.hidden_states[-1]  # ({grid}x{grid} patches, {hidden}): what GranViT's LLM and region features see
```

- **Pad to a square.** The stock image processor resizes to {size} x {size} directly, which squashes non-square images;
  GranViT resizes the longest side and pads (above). Box coordinates in the padded frame are
  `pixels / max(width, height)`.
- **Which layer.** GranViT uses `hidden_states[{layer}]` of the original tower; the layers after it were dropped
  from this export ({kept} of {total} kept), so `hidden_states[-1]` here is exactly that feature. `last_hidden_state`
  additionally applies the tower's `post_layernorm`, which GranViT training did not use (its weights are the
  pretrained tower's).
"""

TILING_README = """
## Tiling (this encoder was trained with up to {max_tiles} tiles per image)

GranViT fed each image as a global thumbnail (the padded square above) plus tiles: the image stretched to the
(cols x rows) grid of {size} px tiles whose aspect ratio best fits it, cut row-major. `tiling_granvit.py` (next to
this README; torch + PIL only) has the rule. GranViT's region features come from the tiles' patch grids put back side
by side, a map that covers exactly the original image (box coordinates there: `x / width`, `y / height`).

```python
from tiling_granvit import cut_tiles, select_tile_grid

rows, cols = select_tile_grid(image.size, max_tiles={max_tiles}, tile_size={size})
tiles = cut_tiles(image, (rows, cols), {size})                            # rows * cols square PIL tiles, row-major
tile_pixels = processor(images=tiles, return_tensors="pt")["pixel_values"]  # square already: nothing to pad
with torch.no_grad():
    hidden = encoder(pixel_values=tile_pixels, output_hidden_states=True).hidden_states[-1]  # (tiles, {grid}*{grid}, {hidden})
# tile (r, c)'s patch (i, j) sits at (r * {grid} + i, c * {grid} + j) of the stitched map
feature_map = hidden.reshape(rows, cols, {grid}, {grid}, -1).permute(0, 2, 1, 3, 4).reshape(rows * {grid}, cols * {grid}, -1)
```
The thumbnail is the padded square above; GranViT's LLM read it first, then each tile, but its region features use the
stitched map only. With a 1 x 1 grid there is no thumbnail: the one tile is the image stretched to a square.
"""


def read_tower_weights(checkpoint: Path) -> dict:
    """The ``*vision_tower.*`` tensors of a (possibly sharded) safetensors checkpoint, without the prefix."""
    index = checkpoint / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for name in files:
        with safe_open(checkpoint / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if PREFIX in key:
                    weights[key.split(PREFIX, 1)[1]] = f.get_tensor(key)
    if not weights:
        raise UserError(f"{checkpoint} has no '{PREFIX}' weights: not a GranViT checkpoint")
    return weights


def layers_used(config: GranViTConfig) -> int:
    """Encoder layers whose output GranViT reads: hidden_states[0] is the embeddings, [i] the output of layer i."""
    total = config.vision_config.num_hidden_layers
    layer = config.vision_feature_layer
    used = total + 1 + layer if layer < 0 else layer
    if not 1 <= used <= total:
        raise ValueError(f"vision_feature_layer={layer} does not pick an encoder layer of a {total}-layer tower")
    return used


def export_encoder(checkpoint: str | Path, out: str | Path):
    """Write the tower + a stock image processor + README to ``out``; returns the tower (a stock transformers model)."""
    checkpoint, out = Path(checkpoint), Path(out)
    config = GranViTConfig.from_pretrained(checkpoint)
    vision_config = config.vision_config
    total, kept = vision_config.num_hidden_layers, layers_used(config)
    vision_config.num_hidden_layers = kept
    weights = {
        k: v for k, v in read_tower_weights(checkpoint).items()
        if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < kept
    }
    tower = AutoModel.from_config(vision_config)
    tower.load_state_dict(weights, strict=True)  # every tensor of the architecture, nothing left over
    tower.save_pretrained(out)

    saved = json.loads((checkpoint / "processor_config.json").read_text())
    # transformers 5 nests the image processor in processor_config.json; older saves wrote preprocessor_config.json.
    granvit_processor = saved.get("image_processor")
    if granvit_processor is None:
        granvit_processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    size = granvit_processor["image_size"]
    SiglipImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,  # as GranViTImageProcessor.pad_to_square
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=granvit_processor["image_mean"],
        image_std=granvit_processor["image_std"],
        do_convert_rgb=True,
    ).save_pretrained(out)
    architecture = type(tower).__name__
    (out / "README.md").write_text(
        README.format(
            architecture=architecture, model_type=vision_config.model_type, size=size, name=out.name,
            patch=vision_config.patch_size, grid=size // vision_config.patch_size, hidden=vision_config.hidden_size,
            layer=config.vision_feature_layer, kept=kept, total=total,
        )
        + (TILING_README.format(max_tiles=config.max_tiles, size=size, grid=size // vision_config.patch_size,
                                hidden=vision_config.hidden_size) if config.max_tiles else "")
    )
    if config.max_tiles:
        shutil.copy(Path(__file__).resolve().parent.parent / "tiling_granvit.py", out / "tiling_granvit.py")
    return tower


@console_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="GranViT checkpoint folder")
    parser.add_argument("out", help="output folder for the plain vision encoder")
    args = parser.parse_args(argv)
    if not (Path(args.checkpoint) / "config.json").is_file():  # a local folder: the weights are read file by file
        raise UserError(f"{args.checkpoint} is not a checkpoint folder (no config.json); pass the folder save_granvit "
                        "wrote")
    tower = export_encoder(args.checkpoint, args.out)
    n_params = sum(p.numel() for p in tower.parameters())
    print(f"Saved {type(tower).__name__} ({n_params / 1e6:.1f}M parameters) to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
