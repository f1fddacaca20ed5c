"""The Hugging Face transport of the download stage: hub files and snapshots, verified.

:func:`fetch_hf_file` / :func:`fetch_hf_snapshot` go through ``huggingface_hub`` (its cache, its
token lookup: ``HF_TOKEN`` or ``hf auth login``; revision pinning; ``HF_ENDPOINT`` mirrors or an
explicit ``endpoint``) and then apply the HTML and checksum checks of :mod:`icmlab.download.fetch`, whose
result type and errors they share: hub exceptions become :class:`~icmlab.download.fetch.AuthError` (gated
or private repositories, with the steps to get access), :class:`~icmlab.download.fetch.NotFoundError` or
:class:`~icmlab.download.fetch.FetchError`, each message saying what to do.

Usage (used by :mod:`icmlab.download.stage`; usable alone)::

    from icmlab.download.hub import fetch_hf_file, fetch_hf_snapshot
    fetch_hf_file("teowu/Q-Instruct", "cleaned_labels.json", repo_type="dataset").path
    fetch_hf_snapshot("openai/clip-vit-large-patch14-336")      # the snapshot directory
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from icmlab.download.fetch import (
    AuthError,
    FetchError,
    FetchResult,
    HTMLInsteadOfData,
    NotFoundError,
    html_message,
    looks_like_html,
    verify_file,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hf_page(repo_id: str, repo_type: str | None) -> str:
    """The web page of a hub repository (for messages)."""
    prefix = "" if repo_type in (None, "model") else f"{repo_type}s/"
    return f"https://huggingface.co/{prefix}{repo_id}"


def _hf_error(e: Exception, repo_id: str, repo_type: str | None, what: str) -> FetchError:
    """Translate a huggingface_hub exception into our errors with an actionable message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    login = (
        f"To get it: request access on {hf_page(repo_id, repo_type)} (logged in), then authenticate this "
        "machine with `hf auth login` or the HF_TOKEN environment variable, and run the step again."
    )
    if isinstance(e, GatedRepoError) or status in (401, 403):
        kind = "gated" if isinstance(e, GatedRepoError) else "private, gated or needs a login"
        return AuthError(f"{what}: {repo_id} is {kind} (the hub answered {status}). {login}")
    if isinstance(e, RevisionNotFoundError):
        return NotFoundError(
            f"{what}: the pinned revision does not exist in {repo_id}; check model.revision or the catalog's revision"
        )
    if isinstance(e, RemoteEntryNotFoundError):
        return NotFoundError(f"{what}: not found in {repo_id} ({hf_page(repo_id, repo_type)})")
    if isinstance(e, RepositoryNotFoundError):
        return NotFoundError(f"{what}: repository {repo_id} not found ({hf_page(repo_id, repo_type)})")
    if isinstance(e, HfHubHTTPError):
        return FetchError(f"{what}: hub error {status}: {str(e).splitlines()[0]}")
    return FetchError(f"{what}: {type(e).__name__}: {e}")


def fetch_hf_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
    verify: bool = True,
    allow_html: bool = False,
) -> FetchResult:
    """Download one file of a hub repository into the Hugging Face cache and verify it.

    Args:
        repo_id: ``org/name``.
        filename: path inside the repository.
        repo_type: ``dataset`` or None for a model repository.
        revision: branch, tag or commit (None = ``main``).
        endpoint: hub URL (a mirror); None = ``HF_ENDPOINT`` or huggingface.co.
        size: expected size, if known.
        sha256: expected sha256; when None and ``verify``, an LFS file is checked against the
            sha256 that names its blob in the cache.
        verify: compute and check the sha256.
        allow_html: accept an HTML body.

    Returns:
        The cached file (a path inside the hub cache snapshot).

    Raises:
        AuthError, NotFoundError, HTMLInsteadOfData, ChecksumError, FetchError.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    what = f"{repo_id}/{filename}"
    try:
        path = Path(
            huggingface_hub.hf_hub_download(
                repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        if isinstance(e, LocalEntryNotFoundError) and not isinstance(e, HfHubHTTPError):
            raise FetchError(
                f"{what}: the hub could not be reached and the file is not cached "
                f"({str(e).splitlines()[0]}); check the network, HF_ENDPOINT or HF_HUB_OFFLINE"
            ) from e
        raise _hf_error(e, repo_id, repo_type, what) from e
    with open(path, "rb") as f:
        head = f.read(2048)
    if not allow_html and looks_like_html(head):
        raise HTMLInsteadOfData(
            html_message(f"{endpoint or huggingface_hub.constants.ENDPOINT}/{repo_id}", what)
            + " (the hub mirror answered with a web page: check HF_ENDPOINT)"
        )
    blob = Path(os.path.realpath(path)).name
    expected = sha256 or (blob if _HEX64.match(blob) else None)
    digest = verify_file(path, size, expected if verify else None, what=what)
    return FetchResult(path, path.stat().st_size, digest)


def fetch_hf_snapshot(
    repo_id: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    max_workers: int = 4,
    prefer_safetensors: bool = True,
) -> Path:
    """Download a hub repository (filtered) into the Hugging Face cache.

    Args:
        repo_id, repo_type, revision, endpoint: as :func:`fetch_hf_file`.
        allow_patterns, ignore_patterns: fnmatch filters passed to ``snapshot_download``.
        max_workers: concurrent file downloads.
        prefer_safetensors: when the repository has ``*.safetensors`` weights, skip ``pytorch_model*.bin``
            (transformers loads the safetensors; the .bin copies would double the download).

    Returns:
        The snapshot directory.

    Raises:
        AuthError, NotFoundError, FetchError.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    ignore = list(ignore_patterns or [])
    try:
        if prefer_safetensors:
            files = huggingface_hub.HfApi(endpoint=endpoint).list_repo_files(
                repo_id, repo_type=repo_type, revision=revision
            )
            if any(f.endswith(".safetensors") for f in files):
                ignore += ["pytorch_model*.bin", "*.pt"]
        path = huggingface_hub.snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            endpoint=endpoint,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore or None,
            max_workers=max_workers,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise _hf_error(e, repo_id, repo_type, repo_id) from e
    return Path(path)
