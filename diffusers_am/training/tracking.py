"""Images to the run's trackers (accelerate's ``GeneralTracker.log_images``): the validation grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def grid_pixels(path: str | Path) -> np.ndarray:
    """The PNG at ``path`` as [H, W, 3] uint8 RGB (a grayscale grid is repeated over the channels)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def log_grid(accelerator: Any, tag: str, path: str | Path, step: int) -> list[str]:
    """Log the grid image at ``path`` under ``tag`` at ``step`` to every tracker that takes images
    (tensorboard: ``add_images``; wandb: ``wandb.Image``); returns the names of the trackers that got it."""
    done = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid_pixels(path)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [grid_pixels(path)]}, step=step)
        else:
            continue
        done.append(tracker.name)
    return done
