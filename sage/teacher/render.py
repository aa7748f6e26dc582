"""ARC grid -> one 224x224 RGB image for the teacher's SigLIP tower.

One image per grid, at the tower's native 224x224: larger renders make the Eagle processor tile them
into many more tokens (the earlier attempt's ~5,160 tokens and OOM). Cells are square, as large as
fit a 208x208 area (a 30x30 grid gets 6 px cells), separated by 1 px dark grey lines and centred on
a white background. White is not an ARC colour, so the grid's extent, i.e. its size, is visible,
and the 8 px margin survives NVIDIA's 95% centre crop should anyone apply it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IMAGE_SIZE = 224
MARGIN = 8
# The standard ARC palette (colours 0..9 as on arcprize.org): black, blue, red, green, yellow,
# grey, magenta, orange, azure, maroon.
ARC_PALETTE = np.array(
    [
        [0x00, 0x00, 0x00],
        [0x00, 0x74, 0xD9],
        [0xFF, 0x41, 0x36],
        [0x2E, 0xCC, 0x40],
        [0xFF, 0xDC, 0x00],
        [0xAA, 0xAA, 0xAA],
        [0xF0, 0x12, 0xBE],
        [0xFF, 0x85, 0x1B],
        [0x7F, 0xDB, 0xFF],
        [0x87, 0x0C, 0x25],
    ],
    dtype=np.uint8,
)
BACKGROUND = np.array([255, 255, 255], dtype=np.uint8)
GRID_LINE = np.array([0x55, 0x55, 0x55], dtype=np.uint8)
RENDER_ID = "sage-render/1"  # bump when the picture changes: cached features depend on it


def cell_size(height: int, width: int, image_size: int = IMAGE_SIZE) -> int:
    return (image_size - 2 * MARGIN) // max(height, width)


def render_grid(grid: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """[image_size, image_size, 3] uint8 picture of a [h, w] grid of colours 0..9."""
    h, w = grid.shape
    cell = cell_size(h, w, image_size)
    if cell < 2:
        raise ValueError(f"a {h}x{w} grid does not fit a {image_size}px image with visible cells")
    block = np.repeat(np.repeat(ARC_PALETTE[grid], cell, axis=0), cell, axis=1)
    framed = np.empty((h * cell + 1, w * cell + 1, 3), dtype=np.uint8)
    framed[1:, 1:] = block
    framed[::cell, :] = GRID_LINE  # lines between cells and the outer frame
    framed[:, ::cell] = GRID_LINE
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    top, left = (image_size - framed.shape[0]) // 2, (image_size - framed.shape[1]) // 2
    image[top : top + framed.shape[0], left : left + framed.shape[1]] = framed
    return image


def to_pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [N, 3, H, W] normalised as GR00T does: (x / 255 - 0.5) / 0.5."""
    if not len(images):
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (batch / 255.0 - 0.5) / 0.5
