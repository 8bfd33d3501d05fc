"""Training prompts: the reproducible :class:`PromptSampler` over prompts read by
:func:`diffusers_am.prompts.load_prompts` (re-exported here with ``check_class_labels``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..prompts import Condition, _as_condition, check_class_labels, load_prompts  # noqa: F401  (re-exported)


class PromptSampler:
    """Draws batches of prompts, reproducibly: the batch of ``slot`` in update ``step`` depends only on
    (seed, step, slot), so a resumed run draws exactly what a straight run would. The trainer's slot is
    ``process_index * gradient_accumulation_steps + micro_batch``: P processes x G micro-batches see the
    same batches as 1 process x P*G micro-batches."""

    def __init__(self, prompts: Sequence[Condition], seed: int = 0):
        if not prompts:
            raise ValueError("`prompts` must not be empty.")
        self.prompts = list(prompts)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, batch_size: int, slot: int = 0) -> list[Condition]:
        """``batch_size`` prompts for update ``step`` and micro-batch slot ``slot``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", step, slot))
        index = torch.randint(len(self.prompts), (batch_size,), generator=gen)
        return [self.prompts[i] for i in index.tolist()]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from a base seed and a tuple of labels (stable across runs and processes)."""
    import hashlib

    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
