"""``--compile``: regional compilation of the transformer's repeated blocks with ``torch.compile``.

Each repeated block (the classes a diffusers model lists in ``_repeated_blocks``, else every module of a
``transformer_blocks`` / ``single_transformer_blocks`` ModuleList) is compiled in place, after the LoRA
is added; the rest of the model runs eagerly. Compilation happens lazily in the first update.
"""

from __future__ import annotations

import torch


def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compile each repeated block of ``model`` in place; returns how many. ValueError when it has none."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        for attr in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            container = getattr(model, attr, None)
            if isinstance(container, torch.nn.ModuleList):
                blocks.extend(container)
    if not blocks:
        raise ValueError(
            f"`--compile`: {type(model).__name__} declares no repeated blocks (`_repeated_blocks` or a "
            "`transformer_blocks` list); drop the flag."
        )
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
