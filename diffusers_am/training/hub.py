"""Upload of a finished output_dir to the Hugging Face Hub (adapter, card, grids, log; no checkpoints)."""

from __future__ import annotations

from pathlib import Path

IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-checkpoint-*", ".tmp-checkpoint-*/**", "logs/**", "*.tmp"]


def push_output_dir(
    output_dir: str | Path, repo_id: str, token: str | None = None, commit_message: str | None = None
) -> str:
    """``create_repo`` (exist_ok) then ``upload_folder``; returns the repo URL. The token is only passed through."""
    from huggingface_hub import create_repo, upload_folder

    if not repo_id or not str(repo_id).strip():
        raise ValueError("`--hub_model_id` must be a repo id like 'user/my-adapter'.")
    url = create_repo(repo_id, exist_ok=True, token=token)
    repo = getattr(url, "repo_id", repo_id)
    upload_folder(
        repo_id=repo,
        folder_path=str(output_dir),
        commit_message=commit_message or "Upload adjoint-matching LoRA adapter",
        ignore_patterns=IGNORE_PATTERNS,
        token=token,
    )
    return str(url)
