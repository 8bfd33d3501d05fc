"""Model adapters, one per pipeline family, and the loader that picks one by pipeline class.

``load_model_adapter(path_or_id)`` reads the pipeline's ``model_index.json`` (a local folder, or
the Hub through huggingface_hub) and dispatches on its ``_class_name``. ``resolve_pretrained`` turns
the short names users type (``FLUX.2-klein``, ``SD3.5-medium``, ``SiT-XL/2`` ...) into Hub ids or folders.

Importing this package imports no torch (``--help`` builds its text from :func:`short_names_help`):
``FlowModelAdapter`` and ``LoraSettings`` are loaded from :mod:`.base` on first use.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from ..errors import UserError

if TYPE_CHECKING:
    from .base import FlowModelAdapter, LoraSettings

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DIGITS_BASE = ASSETS / "digits-sit"
"""The embedded default base: a small class-conditional SiT-style flow trained on the
scikit-learn digits, shipped inside the package."""
EMBEDDED_SHAPES_KLEIN = ASSETS / "shapes-klein"
"""A FLUX.2-klein in miniature (stock ``Flux2KleinPipeline`` format) trained on the shapes captions
(:mod:`diffusers_am.toy.shapes`), shipped inside the package; short name ``shapes-klein``."""
EMBEDDED_NAMES: dict[str, Path] = {"shapes-klein": EMBEDDED_SHAPES_KLEIN}
"""Short names of pipelines shipped inside the package (matched case-insensitively)."""
DEFAULTS_FILE = "diffusers_am_defaults.json"
"""The file in a pipeline folder holding the defaults a run on it takes: ``"training"`` (TrainingConfig
fields) and ``"evaluate"`` (:func:`diffusers_am.evaluate.evaluate` arguments)."""

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


MODEL_OPTIONS = ("offload_text_encoder", "max_sequence_length")
"""Model adapter options some families take (``FlowModelAdapter.options``), settable from the config."""


def adapter_class(pipeline_class_name: str) -> type[FlowModelAdapter]:
    """The adapter class for a pipeline class name; ValueError listing the supported ones."""
    if pipeline_class_name not in ADAPTERS:
        raise UserError(
            f"pipeline class {pipeline_class_name!r} is not supported; supported pipelines: "
            f"{', '.join(sorted(ADAPTERS))}. See README 'Adding a model family'."
        )
    module_name, cls_name = ADAPTERS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


SHORT_NAMES: dict[str, str] = {
    "FLUX.2-klein": "black-forest-labs/FLUX.2-klein-4B",
    "FLUX.2-klein-4B": "black-forest-labs/FLUX.2-klein-4B",
    "FLUX.2-klein-9B": "black-forest-labs/FLUX.2-klein-9B",
    "FLUX.2-klein-base-4B": "black-forest-labs/FLUX.2-klein-base-4B",
    "FLUX.2-klein-base-9B": "black-forest-labs/FLUX.2-klein-base-9B",
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "FLUX.1-schnell": "black-forest-labs/FLUX.1-schnell",
    "SD3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "SD3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "SD3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
"""Short model names -> Hub ids of diffusers pipelines (matched case-insensitively)."""

SIT_XL_2 = "SiT-XL/2"
SIT_XL_2_FOLDER = "sit-xl-2-256"
"""SiT has no diffusers pipeline on the Hub: ``SiT-XL/2`` names the folder that
``scripts/convert_sit_checkpoint.py`` writes from the official checkpoint (README)."""
SIT_XL_2_HOWTO = (
    "download the official SiT-XL-2-256x256.pt (github.com/willisma/SiT, download.py), convert it once with "
    "`python scripts/convert_sit_checkpoint.py --checkpoint_path SiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema "
    f"--output_dir {SIT_XL_2_FOLDER}`, then run from the folder holding {SIT_XL_2_FOLDER}/ or pass "
    f"`--pretrained path/to/{SIT_XL_2_FOLDER}`"
)
HUB_PROBE_TIMEOUT = 5.0
"""Seconds to wait for the Hub's answer about model_index.json before calling it unreachable (no retries)."""


def short_names_help() -> str:
    """The short names and what they resolve to, for ``--help``."""
    names = ", ".join(f"{name} ({repo})" for name, repo in SHORT_NAMES.items())
    names += "".join(f", {name} (shipped: {folder.name})" for name, folder in EMBEDDED_NAMES.items())
    return f"{names}, {SIT_XL_2} (the folder ./{SIT_XL_2_FOLDER} written by scripts/convert_sit_checkpoint.py)"


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """What a ``--pretrained`` value names: an existing local path as given; a short name
    (:data:`SHORT_NAMES`, any case) -> its Hub id; ``SiT-XL/2`` -> ``./sit-xl-2-256`` (ValueError with
    the download and convert commands when that folder is missing); anything else unchanged (a Hub id)."""
    text = str(name_or_path)
    if Path(text).exists():
        return text
    embedded = {name.lower(): folder for name, folder in EMBEDDED_NAMES.items()}
    if text.lower() in embedded:
        return str(embedded[text.lower()])
    by_lower = {name.lower(): repo for name, repo in SHORT_NAMES.items()}
    if text.lower() in by_lower:
        return by_lower[text.lower()]
    if text.lower() == SIT_XL_2.lower():
        if (Path(SIT_XL_2_FOLDER) / "model_index.json").is_file():
            return SIT_XL_2_FOLDER
        raise UserError(
            f"`--pretrained_model_name_or_path` {text!r}: SiT has no diffusers pipeline on the Hub and there is no "
            f"converted folder ./{SIT_XL_2_FOLDER} here; {SIT_XL_2_HOWTO}."
        )
    return text


def pipeline_defaults(name_or_path: str | os.PathLike | None, section: str) -> dict[str, Any]:
    """The ``section`` ("training" or "evaluate") of a local pipeline folder's :data:`DEFAULTS_FILE`
    (short names resolved), or {} when there is none. A string value naming a file in the folder
    (``"prompts_train.txt"``) becomes that file's path; names never leave the folder."""
    if name_or_path is None:
        return {}
    try:
        folder = Path(resolve_pretrained(name_or_path))
    except ValueError:
        return {}
    path = folder / DEFAULTS_FILE
    if not folder.is_dir() or not path.is_file() or path.is_symlink():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}); fix or remove it.") from None
    values = raw.get(section, {}) if isinstance(raw, dict) else {}
    if not isinstance(values, dict):
        raise UserError(f"{str(path)!r}: {section!r} must be an object of option: value.")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and value.endswith(".txt"):
            target = folder / value
            if Path(value).name != value or not target.is_file() or target.is_symlink():
                raise UserError(f"{str(path)!r}: {section}.{key} names {value!r}, which is not a file in that folder.")
            value = str(target)
        out[key] = value
    return out


def _shown(typed: str, repo_id: str) -> str:
    return repr(repo_id) if typed == repo_id else f"{typed!r} (the Hub id {repo_id!r})"


def _download_hint(repo_id: str) -> str:
    folder = repo_id.rsplit("/", 1)[-1]
    return (
        f"download it where the Hub is reachable with `hf download {repo_id} --local-dir {folder}` "
        f"and pass `--pretrained {folder}`"
    )


def _hub_model_index(repo_id: str, typed: str, **hub_kwargs: Any) -> str:
    """Path of the Hub repo's model_index.json (the cached copy when the Hub cannot be reached).

    One request with a short timeout and no retries decides whether the Hub answers (offline mode:
    none), so an unreachable Hub fails in seconds, not after huggingface_hub's retry loop."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = f"`--pretrained_model_name_or_path` {_shown(typed, repo_id)}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"{where} is neither an existing local folder nor a Hub id (org/name): check the path, or use a "
            f"short name ({', '.join(SHORT_NAMES)})."
        ) from None
    revision = hub_kwargs.get("revision")
    if constants.HF_HUB_OFFLINE:
        reason = "the Hub is off (HF_HUB_OFFLINE=1)"
    else:
        try:
            url = hf_hub_url(repo_id, "model_index.json", revision=revision)
            get_hf_file_metadata(url, token=hub_kwargs.get("token"), timeout=HUB_PROBE_TIMEOUT)
            reason = None
        except HfHubHTTPError as err:  # the Hub answered
            status = getattr(err.response, "status_code", None)
            if status is not None and status < 500:  # unknown, private or gated repo
                raise UserError(
                    f"{where} is not a local folder (check the path) and the Hub refused it (HTTP {status}): "
                    f"check the id (short names: {', '.join(SHORT_NAMES)}), or log in with `hf auth login` "
                    "for a gated repo."
                ) from None
            reason = f"the Hub answered HTTP {status}"
        except Exception as err:  # no answer: no network, DNS, proxy, timeout
            reason = f"the Hub is unreachable ({type(err).__name__})"
    if reason is not None:
        cached = try_to_load_from_cache(
            repo_id, "model_index.json", cache_dir=hub_kwargs.get("cache_dir"), revision=revision
        )
        if isinstance(cached, str):
            return cached
        raise UserError(
            f"{where} is not a local folder, not in the Hub cache, and {reason}; "
            f"{_download_hint(repo_id)}."
        )
    try:
        return hf_hub_download(repo_id, "model_index.json", **hub_kwargs)
    except Exception as err:  # the connection dropped between the two requests, a full disk ...
        raise UserError(
            f"{where}: reading model_index.json from the Hub failed ({type(err).__name__}); "
            f"{_download_hint(repo_id)}."
        ) from err


def read_model_index(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """``model_index.json`` of a local pipeline folder or a Hub repo id (short names resolved).

    Raises ValueError for a path that is neither a pipeline folder nor reachable on the Hub, with
    the ``hf download`` command that fetches it."""
    name = resolve_pretrained(pretrained_model_name_or_path)
    path = Path(name)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(
                f"`--pretrained_model_name_or_path` {str(path)!r} is a folder without model_index.json: "
                "point it at a diffusers pipeline folder (the one `pipe.save_pretrained` writes)."
            )
        return json.loads(index.read_text())
    if path.exists():
        raise UserError(
            f"`--pretrained_model_name_or_path` {str(path)!r} is a file: pass a diffusers pipeline folder, a Hub id "
            f"or a short name ({', '.join(SHORT_NAMES)})."
        )
    return json.loads(Path(_hub_model_index(name, str(pretrained_model_name_or_path), **hub_kwargs)).read_text())


def load_model_adapter(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlowModelAdapter:
    """Load a pipeline (folder, Hub id or short name) and wrap it in its family's model adapter (dispatch on
    model_index.json). ``kwargs`` go to its ``from_pretrained`` (``dtype``, and the family's
    :data:`MODEL_OPTIONS`: ValueError in one line for one the family does not take; ``quantize_base`` and
    ``quantize_text_encoders`` for a bitsandbytes base, ValueError in one line for a family that takes none)."""
    name = resolve_pretrained(pretrained_model_name_or_path)
    index = read_model_index(name)
    cls = adapter_class(index.get("_class_name", "<missing _class_name>"))
    cls.check_options({k: v for k, v in kwargs.items() if k in MODEL_OPTIONS})
    quantize = kwargs.get("quantize_base", "none")
    if quantize == "none":
        kwargs.pop("quantize_base", None)
        kwargs.pop("quantize_text_encoders", None)
    elif not cls.quantizable:
        raise UserError(
            f"`--quantize_base {quantize}` applies to the FLUX.2-klein, FLUX.1 and SD3 transformers; "
            f"{index.get('_class_name')} ({cls.__name__}) cannot load a bitsandbytes-quantized base: pass "
            "`--quantize_base none`."
        )
    return cls.from_pretrained(name, **kwargs)


def model_adapter_for(pipeline: Any, **options: Any) -> FlowModelAdapter:
    """Wrap a loaded diffusers pipeline (or a subclass of a supported one) in its family's model adapter
    (:meth:`FlowModelAdapter.from_pipeline`); a model adapter is returned as is (then ``options`` must be
    empty). ValueError naming the supported pipeline classes otherwise."""
    from .base import FlowModelAdapter

    if isinstance(pipeline, FlowModelAdapter):
        if options:
            raise UserError(
                f"{', '.join(sorted(options))}: pass them to the model adapter's constructor when you pass a "
                "model adapter."
            )
        return pipeline
    for klass in type(pipeline).__mro__:
        if klass.__name__ in ADAPTERS:
            return adapter_class(klass.__name__).from_pipeline(pipeline, **options)
    raise UserError(
        f"`pipeline` is a {type(pipeline).__name__}, not a supported pipeline or a FlowModelAdapter; supported "
        f"pipelines: {', '.join(sorted(ADAPTERS))}."
    )


def __getattr__(name: str) -> Any:
    if name in ("FlowModelAdapter", "LoraSettings"):  # torch: imported on first use
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTERS",
    "EMBEDDED_DIGITS_BASE",
    "EMBEDDED_SHAPES_KLEIN",
    "FlowModelAdapter",
    "LoraSettings",
    "adapter_class",
    "load_model_adapter",
    "model_adapter_for",
    "pipeline_defaults",
    "read_model_index",
    "resolve_pretrained",
    "SHORT_NAMES",
]
