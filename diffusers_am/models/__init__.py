"""Model adapters, one per pipeline family, and the loader that picks one by pipeline class.

``load_model_adapter(path_or_id)`` reads the pipeline's ``model_index.json`` (a local folder, or
the Hub through huggingface_hub) and dispatches on its ``_class_name``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from .base import FlowModelAdapter, LoraSettings

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DIGITS_BASE = ASSETS / "digits-sit"
"""The embedded default base: a small class-conditional SiT-style flow trained on the
scikit-learn digits, shipped inside the package."""

# pipeline class name -> "module:AdapterClass" (imported lazily: no diffusers import at package import)
ADAPTERS: dict[str, str] = {
    "SiTPipeline": "diffusers_am.models.sit:SiTAdapter",
    "Flux2KleinPipeline": "diffusers_am.models.flux2:Flux2KleinAdapter",
    "AdjointMatchingFlux2KleinPipeline": "diffusers_am.models.flux2:Flux2KleinAdapter",
    "FluxPipeline": "diffusers_am.models.flux:FluxAdapter",
    "AdjointMatchingFluxPipeline": "diffusers_am.models.flux:FluxAdapter",
    "StableDiffusion3Pipeline": "diffusers_am.models.sd3:SD3Adapter",
    "AdjointMatchingStableDiffusion3Pipeline": "diffusers_am.models.sd3:SD3Adapter",
}


def adapter_class(pipeline_class_name: str) -> type[FlowModelAdapter]:
    """The adapter class for a pipeline class name; ValueError listing the supported ones."""
    if pipeline_class_name not in ADAPTERS:
        raise ValueError(
            f"pipeline class {pipeline_class_name!r} is not supported; supported pipelines: "
            f"{', '.join(sorted(ADAPTERS))}. See README 'Adding a model family'."
        )
    module_name, cls_name = ADAPTERS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def read_model_index(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """``model_index.json`` of a local pipeline folder or a Hub repo id.

    Raises ValueError for a path that is neither a pipeline folder nor reachable on the Hub,
    saying how to pass a local folder when offline."""
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"`--pretrained_model_name_or_path` {str(path)!r} is a folder without model_index.json: "
                "point it at a diffusers pipeline folder (the one `pipe.save_pretrained` writes)."
            )
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download

    try:
        index_file = hf_hub_download(str(pretrained_model_name_or_path), "model_index.json", **hub_kwargs)
    except Exception as err:  # offline, unknown repo, gated repo without a token ...
        raise ValueError(
            f"`--pretrained_model_name_or_path` {str(pretrained_model_name_or_path)!r} is neither a local "
            f"pipeline folder nor reachable on the Hub ({type(err).__name__}). Offline, download the pipeline "
            "elsewhere (`huggingface-cli download <repo> --local-dir <folder>`) and pass that folder."
        ) from err
    return json.loads(Path(index_file).read_text())


def load_model_adapter(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlowModelAdapter:
    """Load a pipeline and wrap it in its family's adapter (dispatch on model_index.json)."""
    index = read_model_index(pretrained_model_name_or_path)
    cls = adapter_class(index.get("_class_name", "<missing _class_name>"))
    return cls.from_pretrained(str(pretrained_model_name_or_path), **kwargs)


__all__ = [
    "ADAPTERS",
    "EMBEDDED_DIGITS_BASE",
    "FlowModelAdapter",
    "LoraSettings",
    "adapter_class",
    "load_model_adapter",
    "read_model_index",
]
