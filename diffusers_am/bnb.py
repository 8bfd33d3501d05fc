"""bitsandbytes, imported only when a run asks for it.

diffusers imports bitsandbytes with ``diffusers.models.modeling_utils`` whenever it is installed (its
quantizers check ``importlib.util.find_spec``), and peft imports it when it adds a LoRA. Importing it costs
seconds, and on a CPU with AVX512-BF16 it asks the Hub for a kernel (``kernels-community/
quantization-bitsandbytes``), which offline prints "could not verify publisher trust status ... Set
trust_remote_code=True". Neither library has a switch for this, so the command-line entry points call
:func:`defer_bitsandbytes` before diffusers is imported: Python's own import block (``sys.modules[name] =
None``) makes ``find_spec`` answer "not installed" and ``import`` raise ImportError, so both libraries take
their no-bitsandbytes path. A flag that needs it (``--use_8bit_adam``; quantized bases) calls
:func:`import_bitsandbytes`, the one place it is imported.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator
from .errors import UserError

NAME = "bitsandbytes"


_held_back = False
"""Whether the block in ``sys.modules`` is ours (a block someone else set, e.g. a test simulating a missing
bitsandbytes, is never lifted here)."""


def defer_bitsandbytes() -> bool:
    """Hide bitsandbytes from diffusers and peft until :func:`import_bitsandbytes`; returns whether the block
    was set (not when bitsandbytes is already imported, or blocked by someone else: then nothing changes)."""
    global _held_back
    if NAME in sys.modules:
        return False
    sys.modules[NAME] = None  # type: ignore[assignment]  # the documented import block
    _held_back = True
    return True


def is_deferred() -> bool:
    """Whether :func:`defer_bitsandbytes` holds bitsandbytes back in this process."""
    return _held_back and NAME in sys.modules and sys.modules[NAME] is None


def undefer_bitsandbytes() -> None:
    """Lift the block of :func:`defer_bitsandbytes` (nothing is imported)."""
    global _held_back
    if is_deferred():
        del sys.modules[NAME]
    _held_back = False


@contextlib.contextmanager
def bitsandbytes_deferred(when: bool = True) -> Iterator[None]:
    """:func:`defer_bitsandbytes` (when ``when``) for the body; the block is lifted at its end, so that the
    calling process (a test, a notebook) can import bitsandbytes afterwards."""
    deferred = bool(when) and defer_bitsandbytes()
    try:
        yield
    finally:
        if deferred:
            undefer_bitsandbytes()


def import_bitsandbytes(flag: str) -> ModuleType:
    """bitsandbytes for ``flag`` (e.g. ``"--use_8bit_adam"``): lifts the block, imports it, and tells diffusers
    and peft (when they were imported while it was blocked) that it is installed. ValueError with the
    install command when it is not installed."""
    was_deferred = is_deferred()
    undefer_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(f"`{flag}` needs bitsandbytes: `pip install bitsandbytes` (or drop the flag).") from err
    if was_deferred:
        _tell_libraries(bitsandbytes)
    return bitsandbytes


def _tell_libraries(bnb: ModuleType) -> None:
    """Refresh what diffusers, peft and transformers concluded about bitsandbytes while it was blocked (their
    availability flags and caches), so that their quantizers and LoRA layers see it."""
    import_utils = sys.modules.get("diffusers.utils.import_utils")
    if import_utils is not None and not getattr(import_utils, "_bitsandbytes_available", True):
        import_utils._bitsandbytes_available = True
        import_utils._bitsandbytes_version = getattr(bnb, "__version__", "N/A")
    quantizer_utils = sys.modules.get("diffusers.quantizers.bitsandbytes.utils")
    if quantizer_utils is not None and not hasattr(quantizer_utils, "bnb"):
        quantizer_utils.bnb = bnb
    for module, names in (
        ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
        ("transformers.utils.import_utils", ("is_bitsandbytes_available",)),
    ):
        for name in names:
            cached = getattr(sys.modules.get(module), name, None)
            if hasattr(cached, "cache_clear"):  # functools.lru_cache
                cached.cache_clear()


def pipeline_needs_bitsandbytes(pretrained: Any) -> bool:
    """Whether a local pipeline folder holds a bitsandbytes-quantized component (a ``quantization_config``
    naming bitsandbytes in a component's ``config.json``). Hub ids and other values: False."""
    if pretrained is None or not isinstance(pretrained, (str, Path)):
        return False
    folder = Path(pretrained)
    if not folder.is_dir():
        return False
    for config in folder.glob("*/config.json"):
        try:
            text = config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "quantization_config" in text and NAME in text:
            return True
    return False


def run_needs_bitsandbytes(config: Any) -> bool:
    """Whether a training run (a ``TrainingConfig``) uses bitsandbytes: ``--use_8bit_adam``, ``--quantize_base
    nf4 | int8``, or a base whose folder holds a bitsandbytes-quantized component."""
    return (
        bool(getattr(config, "use_8bit_adam", False))
        or getattr(config, "quantize_base", "none") not in (None, "none")
        or pipeline_needs_bitsandbytes(getattr(config, "pretrained_model_name_or_path", None))
    )
