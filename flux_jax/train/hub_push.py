"""`flux-jax export --push-to-hub org/name`: an exported LoRA, its model card and grid to a Hub model repository.

Only the files named are uploaded: they are staged (hard links, else copies) in a temporary folder beside them and
that folder goes up with ``huggingface_hub.upload_folder``, so nothing else in the output directory can slip in.
The repository is created when missing (``private`` applies then; an existing one keeps its visibility). The token
is huggingface_hub's (``HF_TOKEN``, else the one `hf auth login` stored). A failed upload is one line and the
local export stays; ``plan_upload`` / ``describe_upload`` (``--dry-run``) contact nothing.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

from flux_jax.errors import FluxJaxError


@dataclasses.dataclass(frozen=True)
class Upload:
    local: pathlib.Path
    repo_path: str
    size: int


def check_repo_id(repo_id: str) -> None:
    """An ``org/name`` model repository id (checked before anything is exported)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise FluxJaxError(f"--push-to-hub {repo_id!r}: not a Hub repository id ({_first_line(e)})") from None
    if repo_id.count("/") != 1:
        raise FluxJaxError(f"--push-to-hub {repo_id!r}: give the repository as org/name (or user/name)")


def plan_upload(files: Sequence[str | os.PathLike]) -> list[Upload]:
    """Each local file and the path it gets at the repository's root (its name)."""
    uploads = [Upload(pathlib.Path(f), pathlib.Path(f).name, pathlib.Path(f).stat().st_size) for f in files]
    names = [u.repo_path for u in uploads]
    if len(set(names)) != len(names):
        raise FluxJaxError(f"two files to upload share a name: {names}")
    return uploads


def describe_upload(uploads: Sequence[Upload], repo_id: str, *, private: bool) -> str:
    """What `--dry-run` prints: the repository, then one line per file (repo path, size)."""
    visibility = " (created private if new)" if private else ""
    lines = [f"dry run: would upload {len(uploads)} files to the Hub model repository {repo_id}{visibility}:"]
    lines += [f"  {u.repo_path}  {u.size:,} bytes" for u in uploads]
    lines.append("dry run: nothing was sent")
    return "\n".join(lines)


def push(uploads: Sequence[Upload], repo_id: str, *, private: bool = False) -> str:
    """Upload exactly ``uploads`` to the model repository ``repo_id`` in one commit; returns the commit's URL."""
    import huggingface_hub

    kept = f"the export is kept in {uploads[0].local.parent}" if uploads else "nothing was exported"
    if huggingface_hub.get_token() is None:
        raise FluxJaxError(
            f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` ({kept})"
        )
    # Staged beside the files: the same filesystem, so hard links (no copy of a large LoRA) nearly always work.
    with tempfile.TemporaryDirectory(dir=uploads[0].local.parent, prefix=".flux-jax-upload-") as stage:
        for u in uploads:
            target = pathlib.Path(stage) / u.repo_path
            try:
                os.link(u.local, target)
            except OSError:
                shutil.copy2(u.local, target)
        try:
            huggingface_hub.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            info = huggingface_hub.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=stage,
                commit_message=f"Upload {uploads[0].repo_path} with flux-jax",
            )
        except (ValueError, *_transport_errors()) as e:
            raise FluxJaxError(f"--push-to-hub {repo_id}: upload failed: {_first_line(e)} ({kept})") from None
    return str(getattr(info, "commit_url", "") or f"{repo_id}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """HTTP statuses, the network, offline mode: HfHubHTTPError and its bases, the transport's error (httpx2's
    HTTPError in huggingface_hub 2.x, whose connection errors are no OSErrors) and OSError."""
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, *HfHubHTTPError.__bases__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
