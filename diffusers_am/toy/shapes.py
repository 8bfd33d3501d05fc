"""The shapes testbed: a seeded, procedural captioned image set and its non-learned gold checker.

Every image is ``RESOLUTION`` x ``RESOLUTION`` RGB on black and holds two objects side by side,
each one of :data:`COLOURS` x :data:`SHAPES`, with the caption

    "a {colour} {shape} to the left of a {colour} {shape}"

(:func:`caption`; :func:`parse_caption` is its inverse). A composition is the tuple
(left colour, left shape, right colour, right shape) of indices; there are 144. A fixed,
seeded set of :data:`NUM_HELDOUT` compositions (:func:`heldout_compositions`) never appears in
training: every single object still appears on both sides in training, only the pairing is new.

Rendering (:func:`render`) is exact and deterministic: each shape is drawn at 4x resolution as a
hard mask and box-filtered down (anti-aliased edges). Object size, position and vertical offset
are drawn from a ``torch.Generator``.

:func:`gold_check` reads pixels only (no learned model): colour segmentation, connected
components, then each object's colour (nearest palette chroma), its horizontal centre and its
shape (a triangle's centroid sits low in its bounding box; a square fills the box's corners, a
circle does not). A caption is an
exact match when there are exactly two objects and both, left to right, have the caption's
colour and shape.

Images are float [B, 3, H, W] in [0, 1] (RGB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..checks import one_of

RESOLUTION = 32
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
PALETTE = torch.tensor([[1.0, 0.15, 0.1], [0.1, 0.85, 0.2], [0.15, 0.3, 1.0], [1.0, 0.9, 0.1]])
"""RGB in [0, 1] of :data:`COLOURS`, on a black background."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUM_HELDOUT = 24
HELDOUT_SEED = 18
SUPERSAMPLE = 4
MIN_AREA = 12
"""Connected components smaller than this (pixels) are ignored by the gold checker as specks."""

_CAPTION = re.compile(r"^\s*an? (\w+) (\w+) to the left of an? (\w+) (\w+)\s*$")

Composition = tuple[int, int, int, int]


def caption(composition: Sequence[int]) -> str:
    """The caption of a composition (left colour, left shape, right colour, right shape)."""
    lc, ls, rc, rs = (int(v) for v in composition)
    return f"a {COLOURS[lc]} {SHAPES[ls]} to the left of a {COLOURS[rc]} {SHAPES[rs]}"


def parse_caption(text: str) -> Composition:
    """Inverse of :func:`caption`; ValueError in one line naming the caption and the grammar."""
    match = _CAPTION.match(str(text).lower())
    words = match.groups() if match else ()
    if not match or words[0] not in COLOURS or words[2] not in COLOURS or words[1] not in SHAPES or words[3] not in SHAPES:
        raise UserError(
            f"prompt {text!r} is not a shapes caption: expected 'a <colour> <shape> to the left of a <colour> <shape>' "
            f"with colour in {', '.join(COLOURS)} and shape in {', '.join(SHAPES)}."
        )
    return COLOURS.index(words[0]), SHAPES.index(words[1]), COLOURS.index(words[2]), SHAPES.index(words[3])


def all_compositions() -> list[Composition]:
    """All 144 compositions in a fixed order."""
    n_c, n_s = len(COLOURS), len(SHAPES)
    return [(a, b, c, d) for a in range(n_c) for b in range(n_s) for c in range(n_c) for d in range(n_s)]


def heldout_compositions() -> list[Composition]:
    """The :data:`NUM_HELDOUT` compositions never shown in training (seeded, fixed), chosen so that
    every (colour, shape) object still appears on the left and on the right in training."""
    comps = all_compositions()
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    while True:
        order = torch.randperm(len(comps), generator=generator).tolist()
        held = sorted(comps[i] for i in order[:NUM_HELDOUT])
        train = set(comps) - set(held)
        left = {(c[0], c[1]) for c in train}
        right = {(c[2], c[3]) for c in train}
        if len(left) == len(right) == len(COLOURS) * len(SHAPES):
            return held


def train_compositions() -> list[Composition]:
    held = set(heldout_compositions())
    return [c for c in all_compositions() if c not in held]


def train_captions() -> list[str]:
    return [caption(c) for c in train_compositions()]


def heldout_captions() -> list[str]:
    return [caption(c) for c in heldout_compositions()]


# -- rendering ---------------------------------------------------------------------------
def _shape_mask(shape: int, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Hard mask [size, size] (float) of a shape of half-extent r centred at (cx, cy), pixel units."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    if SHAPES[shape] == "circle":
        return (((x - cx) ** 2 + (y - cy) ** 2) <= r * r).float()
    if SHAPES[shape] == "square":
        return (((x - cx).abs() <= r) & ((y - cy).abs() <= r)).float()
    # upward triangle: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    inside_y = (y >= cy - r) & (y <= cy + r)
    half_width = (y - (cy - r)) / 2.0
    return (inside_y & ((x - cx).abs() <= half_width)).float()


@dataclass
class ShapesLayout:
    """Where and how large each object is drawn: centres and half-extents in pixels."""

    left_xy: tuple[float, float]
    right_xy: tuple[float, float]
    left_r: float
    right_r: float


def random_layout(generator: torch.Generator, resolution: int = RESOLUTION) -> ShapesLayout:
    """Half-extent in [0.15, 0.2] x side, centres jittered inside their half (never overlapping)."""
    u = torch.rand(6, generator=generator).tolist()
    s = resolution
    lr_, rr_ = s * (0.15 + 0.05 * u[0]), s * (0.15 + 0.05 * u[1])
    lx = s * 0.25 + (u[2] - 0.5) * s * 0.08
    rx = s * 0.75 + (u[3] - 0.5) * s * 0.08
    ly = s * 0.5 + (u[4] - 0.5) * s * 0.3
    ry = s * 0.5 + (u[5] - 0.5) * s * 0.3
    return ShapesLayout((lx, ly), (rx, ry), lr_, rr_)


def render(composition: Sequence[int], layout: ShapesLayout, resolution: int = RESOLUTION) -> torch.Tensor:
    """The image [3, H, W] in [0, 1] of a composition drawn with a layout (anti-aliased)."""
    lc, ls, rc, rs = (int(v) for v in composition)
    k = SUPERSAMPLE
    big = resolution * k
    image = torch.zeros(3, big, big)
    for colour, shape, (cx, cy), r in ((lc, ls, layout.left_xy, layout.left_r), (rc, rs, layout.right_xy, layout.right_r)):
        mask = _shape_mask(shape, cx * k, cy * k, r * k, big)
        image = image * (1 - mask) + PALETTE[colour].view(3, 1, 1) * mask
    return F.avg_pool2d(image[None], k)[0].clamp(0.0, 1.0)


@dataclass
class ShapesDataset:
    """Images [N, 3, H, W] in [0, 1], compositions [N, 4] int64 and their captions."""

    images: torch.Tensor
    compositions: torch.Tensor
    captions: list[str]


def make_dataset(per_composition: int, split: str = "train", seed: int = 0, resolution: int = RESOLUTION) -> ShapesDataset:
    """``per_composition`` random layouts of each composition of ``split`` ("train", "heldout" or "all"),
    in a fixed order, drawn from ``torch.Generator().manual_seed(seed)``: the same arguments give the
    same tensors on every machine."""
    comps = {"train": train_compositions, "heldout": heldout_compositions, "all": all_compositions}
    one_of(split, "split", comps)
    generator = torch.Generator().manual_seed(seed)
    images, rows = [], []
    for comp in comps[split]():
        for _ in range(per_composition):
            images.append(render(comp, random_layout(generator, resolution), resolution))
            rows.append(comp)
    return ShapesDataset(torch.stack(images), torch.tensor(rows, dtype=torch.int64), [caption(c) for c in rows])


# -- gold checker ------------------------------------------------------------------------
@dataclass
class FoundObject:
    """One detected object: palette colour index, shape index, centre x (pixels), area (pixels)."""

    colour: int
    shape: int
    x: float
    area: int


def _components(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask [H, W], as lists of (y, x)."""
    h, w = mask.shape
    seen = torch.zeros_like(mask)
    flat = mask.tolist()
    seen_l = seen.tolist()
    out = []
    for y0 in range(h):
        for x0 in range(w):
            if not flat[y0][x0] or seen_l[y0][x0]:
                continue
            stack, comp = [(y0, x0)], []
            seen_l[y0][x0] = True
            while stack:
                y, x = stack.pop()
                comp.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and flat[ny][nx] and not seen_l[ny][nx]:
                        seen_l[ny][nx] = True
                        stack.append((ny, nx))
            out.append(comp)
    return out


def _shape_of(points: list[tuple[int, int]], peak: torch.Tensor) -> int:
    """Shape of one component (pixels (y, x)) from its bounding box: a triangle (apex up) has its
    centroid a sixth of the box height below the box centre (circle and square: at the centre);
    a square fills its box corners, a circle leaves them empty (``peak``: [H, W] brightness)."""
    ys = [p[0] for p in points]
    xs = [p[1] for p in points]
    y0, y1, x0, x1 = min(ys), max(ys), min(xs), max(xs)
    height = y1 - y0 + 1
    offset = (sum(ys) / len(ys) - (y0 + y1) / 2) / height
    if offset > 0.07:
        return SHAPES.index("triangle")
    corners = float(peak[[y0, y0, y1, y1], [x0, x1, x0, x1]].mean())
    return SHAPES.index("square") if corners >= 0.15 else SHAPES.index("circle")


def find_objects(image: torch.Tensor) -> list[FoundObject]:
    """The objects in one image [3, H, W] in [0, 1], left to right.

    A pixel is foreground when its brightest channel is >= 0.5; its colour is the palette entry
    nearest in chroma (RGB divided by the brightest channel). Components are 4-connected and of one
    colour; those under :data:`MIN_AREA` pixels are ignored."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise UserError(f"`image` must be [3, H, W]; got shape {tuple(image.shape)}.")
    img = image.detach().float().cpu().clamp(0, 1)
    peak = img.max(dim=0).values
    fg = peak >= 0.5
    chroma = img / peak.clamp_min(1e-6)
    palette = PALETTE / PALETTE.max(dim=1, keepdim=True).values
    dist = ((chroma[None] - palette[:, :, None, None]) ** 2).sum(dim=1)  # [C, H, W]
    nearest = dist.argmin(dim=0)
    found = []
    for colour in range(len(COLOURS)):
        for comp in _components(fg & (nearest == colour)):
            if len(comp) < MIN_AREA:
                continue
            x = sum(p[1] for p in comp) / len(comp) + 0.5
            found.append(FoundObject(colour, _shape_of(comp, peak), x, len(comp)))
    return sorted(found, key=lambda o: o.x)


def gold_check(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Exact match [B] bool of images [B, 3, H, W] in [0, 1] against their captions: exactly two
    objects, the left one of the caption's first colour and shape, the right one of its second."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"`images` must be [B, 3, H, W]; got shape {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise UserError(f"`prompts` has {len(prompts)} captions but `images` has batch size {images.shape[0]}.")
    out = []
    for image, prompt in zip(images, prompts):
        lc, ls, rc, rs = parse_caption(prompt)
        objs = find_objects(image)
        ok = len(objs) == 2 and (objs[0].colour, objs[0].shape, objs[1].colour, objs[1].shape) == (lc, ls, rc, rs)
        out.append(ok)
    return torch.tensor(out, dtype=torch.bool)


def gold_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Share of exact matches (:func:`gold_check`) in [0, 1]."""
    return float(gold_check(images, prompts).float().mean())


__all__ = [
    "COLOURS",
    "PALETTE",
    "RESOLUTION",
    "SHAPES",
    "ShapesDataset",
    "all_compositions",
    "caption",
    "find_objects",
    "gold_accuracy",
    "gold_check",
    "heldout_captions",
    "heldout_compositions",
    "make_dataset",
    "parse_caption",
    "render",
    "train_captions",
    "train_compositions",
]
