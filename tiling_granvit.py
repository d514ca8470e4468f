"""High-resolution tiling: a global thumbnail plus tiles on the grid whose aspect ratio best fits the image.

An image of width w and height h goes to the model as views of the model's square resolution S:
- view 0, the global thumbnail: the whole image, longest side resized to S and padded to a square (the untiled input);
- views 1 .. rows * cols, the tiles: the image *stretched* to (cols * S, rows * S) and cut row-major into S x S tiles.
A 1 x 1 grid has no thumbnail (it would repeat the one tile), as in InternVL.

The grid is InternVL's / GOT-OCR2's rule (``GotOcr2ImageProcessor.crop_image_to_patches``, InternVL's
``dynamic_preprocess``): among every (cols, rows) with 1 <= cols * rows <= max_tiles, the one whose cols / rows is
closest to w / h; on a tie the larger grid wins when the image has more than half the grid's pixels (a big image earns
more tiles). Stretching instead of padding (LLaVA-NeXT pads) is what makes the tiles exact for boxes: the stitched
tile map (the tiles' patch grids put back side by side, (rows * g, cols * g) patches) covers exactly the original
image, so a box normalized to the original image *is* its position on that map; the distortion is bounded by how far
the best grid's ratio is from the image's.

This file is copied into every checkpoint (image_processing_granvit.py and modeling_granvit.py import it); a plain
SigLIP user who exported the encoder can copy it too (README, "Encoder export with tiling").
"""

import torch
from PIL import Image

THUMBNAIL_MARKER = "global:"  # text before each view's image tokens, so the LLM knows which view a token belongs to


def tile_marker(row: int, col: int) -> str:
    return f"tile {row + 1},{col + 1}:"


def select_tile_grid(image_size: tuple[int, int], max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid for an image of ``(width, height)`` pixels (InternVL / GOT-OCR2 rule)."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1 to tile, got {max_tiles}")
    width, height = image_size
    aspect = width / height
    candidates = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
        key=lambda cr: cr[0] * cr[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def num_views(grid) -> int:
    """Views of one tiled image: the thumbnail + rows * cols tiles, or the single tile of a 1 x 1 grid."""
    rows, cols = int(grid[0]), int(grid[1])
    return 1 if rows * cols == 1 else 1 + rows * cols


def view_markers(grid) -> list[str]:
    """The marker text of each view, in view order (thumbnail first, then tiles row-major)."""
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols == 1:
        return [THUMBNAIL_MARKER]
    return [THUMBNAIL_MARKER] + [tile_marker(r, c) for r in range(rows) for c in range(cols)]


def cut_tiles(image: Image.Image, grid, tile_size: int) -> list[Image.Image]:
    """The image stretched to the grid and cut into ``rows * cols`` tiles of ``tile_size``, row-major."""
    rows, cols = int(grid[0]), int(grid[1])
    stretched = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    return [
        stretched.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]


def check_image_grids(num_pixel_views: int, image_grids: torch.Tensor | None, max_tiles: int) -> None:
    """Refuse pixel_values preprocessed another way than a checkpoint was trained (its ``config.max_tiles``)."""
    if max_tiles and image_grids is None:
        raise ValueError(
            f"pixel_values with {num_pixel_views} view(s) came without image_grids, but this checkpoint tiles images "
            f"(config.max_tiles={max_tiles}): preprocess with its own processor / image processor, which returns "
            "image_grids, and pass them along (model(..., image_grids=...))"
        )
    if not max_tiles and image_grids is not None:
        raise ValueError(
            "image_grids were given, but this checkpoint does not tile images (config.max_tiles=0): preprocess with "
            "its own processor, whose pixel_values hold one padded square per image"
        )
    if image_grids is None:
        return
    shape_ok = image_grids.ndim == 2 and image_grids.shape[-1] == 2
    if not shape_ok or (image_grids < 1).any() or (image_grids.prod(-1) > max_tiles).any():
        raise ValueError(
            f"image_grids {image_grids.tolist()} must be (images, 2) (rows, cols) grids of 1 to "
            f"config.max_tiles={max_tiles} tiles: preprocess with this checkpoint's own processor"
        )
    views = sum(num_views(g) for g in image_grids.tolist())
    if views != num_pixel_views:
        raise ValueError(
            f"pixel_values has {num_pixel_views} views but image_grids {image_grids.tolist()} need {views} "
            "(a thumbnail + rows x cols tiles per image): pass the pixel_values and image_grids of one call"
        )


def stitch_tiles(view_features: torch.Tensor, image_grids: torch.Tensor) -> list[torch.Tensor]:
    """Per-view patch grids -> one stitched tile map per image (the thumbnail is left out).

    view_features: (sum of views, g, g, d), views of image 0 first (see ``num_views``); image_grids: (images, 2)
    (rows, cols). Returns one (rows * g, cols * g, d) map per image, covering exactly the original image.
    """
    maps, start = [], 0
    g, d = view_features.shape[1], view_features.shape[-1]
    for rows, cols in image_grids.tolist():
        n = num_views((rows, cols))
        tiles = view_features[start + (n > 1) : start + n]  # (rows * cols, g, g, d)
        start += n
        # (rows, cols, g, g, d) -> (rows, g, cols, g, d): patch (i, j) of tile (r, c) sits at (r*g + i, c*g + j)
        maps.append(tiles.reshape(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d))
    if start != view_features.shape[0]:
        raise ValueError(
            f"image_grids {image_grids.tolist()} account for {start} views but the features have "
            f"{view_features.shape[0]}: pass the pixel_values and image_grids of one processor call together"
        )
    return maps


__all__ = ["check_image_grids", "cut_tiles", "num_views", "select_tile_grid", "stitch_tiles", "tile_marker", "view_markers"]
