"""Upload an exported folder to the Hugging Face Hub (needs the internet and a token with write
access: HF_TOKEN, or `hf auth login`). HF_ENDPOINT points it at another hub."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2tune.errors import UserError

TOKEN_HINT = "set HF_TOKEN to a token with write access (or run `hf auth login`)"


def _explain(repo_id: str, err: Exception) -> UserError:
    from huggingface_hub import constants

    status = getattr(getattr(err, "response", None), "status_code", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if status == 401:
        who = "the token in HF_TOKEN was refused" if os.environ.get("HF_TOKEN") else "no valid token was sent"
        return UserError(f"--push-to-hub {repo_id}: the hub refused the upload (401: {who}): {TOKEN_HINT}")
    if status == 403:
        return UserError(f"--push-to-hub {repo_id}: the token may not write to {repo_id.split('/')[0]!r} (403): {TOKEN_HINT}")
    if status is not None:
        return UserError(f"--push-to-hub {repo_id}: the hub answered {first}")
    return UserError(f"--push-to-hub {repo_id}: cannot reach the hub at {constants.ENDPOINT} ({first})")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo if needed and upload `folder`; return the commit URL."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserError(f"--push-to-hub {repo_id!r}: expected a repo id NAME or ORG/NAME")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload model exported with gpt2tune")
    except HfHubHTTPError as err:
        raise _explain(repo_id, err) from None
    except OfflineModeIsEnabled:
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload") from None
    except (httpx2.TransportError, ConnectionError) as err:
        raise _explain(repo_id, err) from None
    except ValueError as err:  # an invalid repo id, as huggingface_hub validates it
        raise UserError(f"--push-to-hub {repo_id}: {str(err).strip().splitlines()[0]}") from None
    return str(getattr(commit, "commit_url", commit))
