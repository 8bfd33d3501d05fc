"""The Hugging Face Hub side of ``--push_to_hub``: the repo is created (or checked) at set-up, before any
training, so an offline machine or a missing login fails at once with one line; the finished run's
adapter, card, grids and logs are uploaded at the end (never checkpoints, or files the run did not write).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def prepare_repo(repo_id: str, token: str | None = None) -> str:
    """``create_repo(repo_id, exist_ok=True)``; returns the full repo id (``user/name``).

    ValueError with one line when the Hub is offline (``HF_HUB_OFFLINE``), unreachable, or refuses (no login,
    no write access, a bad repo id). The token is only passed through."""
    from huggingface_hub import constants, create_repo

    if not repo_id or not str(repo_id).strip():
        raise ValueError("`--hub_model_id` must be a repo id like 'user/my-adapter'.")
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "`--push_to_hub`: the Hub is offline here (HF_HUB_OFFLINE is set); unset it, or drop `--push_to_hub` "
            "and upload the output folder later."
        )
    try:
        url = create_repo(repo_id, exist_ok=True, token=token)
    except Exception as err:  # network errors (httpx), HTTP errors (401, 403), HFValidationError ...
        raise ValueError(
            f"`--push_to_hub`: cannot create or reach the Hub repo {repo_id!r} ({_reason(err)}); check the network "
            "and your login (`hf auth login`), or drop `--push_to_hub`."
        ) from None
    return getattr(url, "repo_id", repo_id)


def upload_output_dir(
    output_dir: str | Path,
    repo_id: str,
    files: Sequence[str],
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """``upload_folder`` of the run's ``files`` (glob patterns relative to ``output_dir``); returns the repo URL."""
    from huggingface_hub import upload_folder

    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message or "Upload adjoint-matching LoRA adapter",
        allow_patterns=list(files),
        token=token,
    )
    return str(getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}")
