"""The one image grid of validation (``validation/*.png``, ``comparison.png``) and evaluation
(``samples_<model>.png``): tiles in rows, each row labelled (its prompt or class label), a title above, and
side-by-side panels of several models on the same noise (:func:`comparison_grid`). Text is drawn with PIL's
default font."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ..errors import UserError

MAX_LABEL_CHARS = 48
"""Longer row labels (prompts) are cut to this many characters, ending in '...'."""


def _tiles(images: torch.Tensor, nrow: int, pad: int) -> tuple[Any, list[tuple[int, int]]]:
    """(PIL image tiling ``images`` [B, C, H, W] in [0, 1] row-major, ``nrow`` per row; each row's (top,
    bottom) pixel rows). Tiny images (digits are 8x8) are upscaled (nearest) so that the grid is legible."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"`images` must be [B, C, H, W] with C in (1, 3); got {tuple(images.shape)}.")
    b, c, h, w = images.shape
    cols = max(1, min(nrow, b))
    rows = (b + cols - 1) // cols
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8) * 255
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = 1
    if max(image.size) < 256:
        scale = 512 // max(image.size)
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    bands = [((pad + r * (h + pad)) * scale, (pad + r * (h + pad) + h) * scale) for r in range(rows)]
    return image, bands


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _short(label: Any) -> str:
    text = " ".join(str(label).split())
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."


def row_label(condition: Any) -> str:
    """How a grid row names its condition: ``class 7`` for a class label, the prompt itself otherwise."""
    return f"class {condition}" if isinstance(condition, int) and not isinstance(condition, bool) else _short(condition)


def _labelled(panels: Sequence[tuple[str | None, Any]], bands: list[tuple[int, int]],
              row_labels: Sequence[str] | None, pad: int = 12):
    """The panels (same size) side by side, each with its title above, ``row_labels`` in a column at the left
    (centred on the rows' pixel ``bands``); white background, black text, RGB."""
    from PIL import Image, ImageDraw

    if row_labels is not None and len(row_labels) != len(bands):
        raise UserError(f"`row_labels` must name each of the {len(bands)} rows; got {len(row_labels)}.")
    width, height = panels[0][1].size
    tile = bands[0][1] - bands[0][0]
    font = _font(max(12, min(28, tile // 4)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    labels = [_short(t) for t in row_labels] if row_labels is not None else []
    label_width = max((size(t)[0] for t in labels), default=0) + (2 * pad if labels else 0)
    titles = [t for t, _ in panels if t]
    title_height = size("Ag,")[1] + 2 * pad if titles else 0  # the same for any title: grids line up
    gap = pad if len(panels) > 1 else 0
    out = Image.new("RGB", (label_width + len(panels) * width + (len(panels) - 1) * gap, title_height + height), "white")
    draw = ImageDraw.Draw(out)
    for i, (title, panel) in enumerate(panels):
        x = label_width + i * (width + gap)
        out.paste(panel.convert("RGB"), (x, title_height))
        if title:
            text = _short(title)
            draw.text((x + (width - size(text)[0]) // 2, pad), text, fill="black", font=font)
    for text, (top, bottom) in zip(labels, bands):
        w, h = size(text)
        draw.text((label_width - pad - w, title_height + (top + bottom - h) // 2), text, fill="black", font=font)
    return out


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, *, row_labels: Sequence[Any] | None = None,
               title: str | None = None):
    """A PIL image tiling ``images`` [B, C, H, W] in [0, 1] row-major, ``nrow`` images per row; with
    ``row_labels`` (one per row: prompts, class labels) and / or a ``title``, they are written beside / above it."""
    image, bands = _tiles(images, nrow, pad)
    if row_labels is None and title is None:
        return image
    return _labelled([(title, image)], bands, None if row_labels is None else [row_label(c) for c in row_labels])


def comparison_grid(panels: dict[str, torch.Tensor], nrow: int, row_labels: Sequence[Any] | None = None, pad: int = 2):
    """Several models' images of the same conditions and noise side by side: one titled panel per entry of
    ``panels`` (title -> [B, C, H, W] in [0, 1], the same shape for each), rows labelled once at the left."""
    if not panels:
        raise UserError("`panels` must hold at least one model's images.")
    shapes = {tuple(images.shape) for images in panels.values()}
    if len(shapes) != 1:
        raise UserError(f"every panel must hold images of the same shape; got {sorted(shapes)}.")
    tiled = [(title, *_tiles(images, nrow, pad)) for title, images in panels.items()]
    labels = None if row_labels is None else [row_label(c) for c in row_labels]
    return _labelled([(title, image) for title, image, _ in tiled], tiled[0][2], labels)


def save_grid(images: torch.Tensor, nrow: int, path: str | Path, *, row_labels: Sequence[Any] | None = None,
              title: str | None = None) -> Path:
    """Write ``image_grid(images, nrow, row_labels=..., title=...)`` as PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow, row_labels=row_labels, title=title).save(path)
    return path
