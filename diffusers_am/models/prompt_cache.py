"""Prompt-embedding cache: encode every prompt a run needs once, then drop the text encoders.

:class:`PromptEmbeddingCache` stores, per unique prompt, the rows of the adapter's encoded batch
(``Flux2Prompts``, ``FluxPrompts``, ``SD3Prompts``: dataclasses of [B, ...] tensors); fields shared by
every row (dim 0 of size 1 while the chunk has several prompts, e.g. the empty prompt of CFG) are kept
once. :meth:`PromptEmbeddingCache.encode` rebuilds a batch in the requested order, exactly what the
encoder returns for that batch (the text encoders pad to a fixed length, so a row does not depend on
the other prompts of its chunk). Optionally the cache lives on disk as one safetensors file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import UserError
from ..checks import positive_int
from ..filemode import match_umask


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class PromptEmbeddingCache:
    """Encoded rows per prompt: ``rows[prompt][field]`` [1, ...], ``shared[field]`` (kept whole), and the
    encoded batch's dataclass ``kind``. Build with :meth:`build`; read a batch with :meth:`encode`."""

    def __init__(self, rows: dict[str, dict[str, torch.Tensor]], shared: dict[str, torch.Tensor | None], kind: type):
        self.rows = rows
        self.shared = shared
        self.kind = kind

    @classmethod
    def build(
        cls, encode: Callable[[list[str]], Any], prompts: Sequence[str], chunk_size: int = 16
    ) -> "PromptEmbeddingCache":
        """Encode ``prompts`` (duplicates once) with ``encode`` (``list[str] -> encoded batch``, a dataclass of
        tensors), ``chunk_size`` prompts per call."""
        unique = list(dict.fromkeys(prompts))
        if not unique:
            raise UserError("the prompt cache needs at least one prompt.")
        positive_int(chunk_size, "chunk_size")
        single = encode(unique[:1])
        if not dataclasses.is_dataclass(single):
            raise UserError(f"cannot cache encoded prompts of type {type(single).__name__} (not a dataclass).")
        rows: dict[str, dict[str, torch.Tensor]] = {p: {} for p in unique}
        shared: dict[str, torch.Tensor | None] = {}
        for start in range(0, len(unique), chunk_size):
            chunk = unique[start : start + chunk_size]
            # two or more rows per call: a per-row field has dim 0 = rows here and 1 for a single prompt
            probe = chunk if len(chunk) > 1 else chunk * 2
            encoded = encode(probe)
            for f in dataclasses.fields(encoded):
                value, one = getattr(encoded, f.name), getattr(single, f.name)
                per_row = isinstance(value, torch.Tensor) and value.shape[0] == len(probe) and one.shape[0] == 1
                if not per_row:
                    shared.setdefault(f.name, value)
                    continue
                for i, prompt in enumerate(chunk):
                    rows[prompt][f.name] = value[i : i + 1].detach().clone()
        return cls(rows, shared, type(single))

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.rows

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tensors."""
        tensors = [t for row in self.rows.values() for t in row.values()]
        tensors += [t for t in self.shared.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def encode(self, prompts: Sequence[str]) -> Any:
        """The encoded batch of ``prompts`` [B, ...] (each must be cached); KeyError names a missing one."""
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"prompt(s) not in the prompt-embedding cache: {missing[:3]!r}")
        fields = {name: value for name, value in self.shared.items()}
        for name in self.rows[prompts[0]]:
            fields[name] = torch.cat([self.rows[p][name] for p in prompts])
        return self.kind(**fields)

    def to(self, device: torch.device | str) -> "PromptEmbeddingCache":
        self.rows = {p: {k: v.to(device) for k, v in row.items()} for p, row in self.rows.items()}
        self.shared = {k: (v.to(device) if v is not None else None) for k, v in self.shared.items()}
        return self

    # -- disk -------------------------------------------------------------------------------------
    def save(self, path: str | Path, key: str) -> None:
        """One safetensors file: tensors ``<index>.<field>`` / ``shared.<field>``, prompts and key in metadata."""
        from safetensors.torch import save_file

        prompts = list(self.rows)
        tensors = {f"{i}.{k}": v.contiguous().cpu() for i, p in enumerate(prompts) for k, v in self.rows[p].items()}
        tensors.update({f"shared.{k}": v.contiguous().cpu() for k, v in self.shared.items() if v is not None})
        meta = {
            "prompts": json.dumps(prompts), "key": key, "kind": self.kind.__name__,
            "shared_none": json.dumps([k for k, v in self.shared.items() if v is None]),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{os.getpid()}.tmp")  # one per process: several ranks may write the same cache
        save_file(tensors, str(tmp), metadata=meta)
        match_umask(tmp)  # safetensors writes 0600
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, key: str, kind: type) -> "PromptEmbeddingCache | None":
        """The cache saved at ``path`` if it was written for ``key`` (same model, prompts and settings), else None."""
        from safetensors import safe_open

        if not Path(path).is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key or meta.get("kind") != kind.__name__:
                return None
            prompts = json.loads(meta["prompts"])
            rows: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prompts}
            shared: dict[str, torch.Tensor | None] = {k: None for k in json.loads(meta.get("shared_none", "[]"))}
            for name in handle.keys():
                head, _, field = name.partition(".")
                if head == "shared":
                    shared[field] = handle.get_tensor(name)
                else:
                    rows[prompts[int(head)]][field] = handle.get_tensor(name)
        return cls(rows, shared, kind)


def cache_key(*parts: Any) -> str:
    """A short hex digest identifying what was encoded (model, prompts, sequence length, dtype)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
