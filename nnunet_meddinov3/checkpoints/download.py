"""Registered checkpoints from the Hugging Face hub (``meddinov3 weights fetch``): the download, with errors that
say what to do when offline, gated or misnamed. huggingface_hub is optional and imported only when downloading."""
from __future__ import annotations

from pathlib import Path


class FetchError(RuntimeError):
    """A registered checkpoint cannot be fetched; the message says why and what to do instead."""


def _endpoint_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the hub endpoint opens, else why not (fails fast when offline,
    where huggingface_hub would retry for half a minute)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"


def download_from_hub(repo_id: str, filename: str, revision: str | None = None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:
        raise FetchError("fetching needs huggingface_hub: pip install 'nnunet-meddinov3[hub]'") from e

    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    offline_help = (f"Download it on a machine with internet access (huggingface.co/{repo_id}, file {filename}) "
                    "and pass its path to `meddinov3 weights convert`, or copy the Hugging Face cache over")
    if constants.HF_HUB_OFFLINE:
        raise FetchError(f"cannot fetch {where}: HF_HUB_OFFLINE is set and the file is not in the local "
                         f"Hugging Face cache ({constants.HF_HUB_CACHE}). Unset HF_HUB_OFFLINE, or: {offline_help}.")
    problem = _endpoint_reachable(constants.ENDPOINT)
    if problem:
        raise FetchError(f"cannot fetch {where}: the hub at {constants.ENDPOINT} is unreachable ({problem}); "
                         f"you seem to be offline. {offline_help}.")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except GatedRepoError as e:
        raise FetchError(f"{repo_id} is gated: accept its licence on huggingface.co/{repo_id}, then log in "
                         "(`hf auth login`) or set HF_TOKEN, and fetch again") from e
    except RepositoryNotFoundError as e:
        raise FetchError(f"repository {repo_id} not found (or private and you are not logged in)") from e
    except LocalEntryNotFoundError as e:
        raise FetchError(f"cannot fetch {where}: the hub could not be reached and the file is not cached. "
                         f"{offline_help}.") from e
    except EntryNotFoundError as e:
        raise FetchError(f"{repo_id} has no file {filename}; the registry entry needs fixing") from e
    except (HfHubHTTPError, OSError, huggingface_hub.errors.HFValidationError) as e:
        raise FetchError(f"cannot fetch {where}: {e}") from e
