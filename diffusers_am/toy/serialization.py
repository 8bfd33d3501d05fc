"""Folders of the small classifiers shipped with the package: ``model.safetensors`` + ``config.json``.

One home for the save / load code of the digits and shapes classifiers (no pickle: weights as
safetensors, the constructor's dataclass config as JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..jsonio import dumps

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ClassifierFolderMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from ``self.config`` (a dataclass
    of type ``config_class``). ``trained_by`` names what writes such folders, for the missing-file error."""

    config_class: ClassVar[type]
    trained_by: ClassVar[str]
    config: Any

    def save_pretrained(self, save_directory: str | Path, extra_config: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (constructor arguments, plus ``extra_config``
        entries under ``"training"``) into ``save_directory``."""
        from safetensors.torch import save_model

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"architecture": type(self).__name__, **asdict(self.config)}
        if extra_config:
            config["training"] = extra_config
        (out / CONFIG_NAME).write_text(dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None):
        """Load a folder written by :meth:`save_pretrained` (strict: every weight must match); ValueError
        naming the folder when a file is missing or the config describes another architecture."""
        from safetensors.torch import load_model

        folder = Path(directory)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
        if missing:
            raise UserError(
                f"{cls.__name__} folder {str(folder)!r} lacks {', '.join(missing)}: it must hold {WEIGHTS_NAME} "
                f"and {CONFIG_NAME} as written by `{cls.__name__}.save_pretrained` ({cls.trained_by})."
            )
        raw = json.loads((folder / CONFIG_NAME).read_text())
        if raw.get("architecture", cls.__name__) != cls.__name__:
            raise UserError(f"{str(folder / CONFIG_NAME)!r} describes a {raw['architecture']!r}, not a {cls.__name__}.")
        known = cls.config_class.__dataclass_fields__
        model = cls(cls.config_class(**{k: v for k, v in raw.items() if k in known}))
        load_model(model, str(folder / WEIGHTS_NAME), strict=True, device=str(device or "cpu"))
        return model
