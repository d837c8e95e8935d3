"""Upload an exported folder to the Hugging Face Hub (needs the internet and a token:
`huggingface-cli login` or HF_TOKEN)."""

from __future__ import annotations

from pathlib import Path

from gpt2tune.errors import UserError


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo if needed and upload `folder`; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload model exported with gpt2tune")
    except Exception as err:  # offline, no token, no permission, bad id...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--push-to-hub {repo_id}: {msg}") from None
    return str(getattr(commit, "commit_url", commit))
