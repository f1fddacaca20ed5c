"""Pushing a folder to a Hugging Face Hub model repo (the real hub, a mirror, or the tests' loopback hub).

The token comes from the usual places (``HF_TOKEN``, ``huggingface-cli login``); it is sent to the
hub and never written anywhere by icmlab. ``endpoint`` (``download.endpoint``) points at a mirror;
None means ``HF_ENDPOINT`` or huggingface.co.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("icmlab.export.hub")

#: ``org/name`` of a hub repo (names: letters, digits, ``-_.``; up to 96 characters each).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError (naming ``export.repo_id``) unless ``repo_id`` is ``org/name``."""
    if not REPO_ID.match(repo_id):
        raise ValueError(f"export.repo_id: {repo_id!r} is not a hub repo id; write it as org/name")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    endpoint: str | None = None,
    commit_message: str = "icmlab export",
) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created when missing).

    Returns:
        The commit URL.

    Raises:
        ValueError: for a repo id that is not ``org/name``.
        FileNotFoundError: when ``folder`` does not exist.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: nothing to push (run the export first)")
    api = HfApi(endpoint=endpoint)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s to %s (%s)", folder, repo_id, url)
    return url
