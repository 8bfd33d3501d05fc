"""Pipeline subclasses of stock FlowMatch pipelines with a controlled-velocity step.

Imported lazily (``from diffusers_am.pipelines import AdjointMatchingFlux2KleinPipeline``), so
importing the package does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdjointMatchingFlux2KleinPipeline": "diffusers_am.pipelines.flux2",
    "AdjointMatchingFluxPipeline": "diffusers_am.pipelines.flux",
    "AdjointMatchingStableDiffusion3Pipeline": "diffusers_am.pipelines.sd3",
    "ControlledVelocityMixin": "diffusers_am.pipelines.controlled",
    "SiTPipeline": "diffusers_am.pipelines.sit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_am.pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
