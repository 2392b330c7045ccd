"""Fail fast on a Hugging Face Hub name that cannot load: offline (``HF_HUB_OFFLINE``) or with the Hub out of
reach, a name that is not in the local cache is an error at once, instead of after the client's retries (about
100 s on a machine without a route to the Hub). Local paths and cached models load as before."""

from __future__ import annotations

from pathlib import Path


def hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host (port 443) opens within ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_loadable(name: str, what: str, marker: str = "config.json") -> None:
    """Raise ``OSError`` at once when ``name`` is neither a local path nor a cached Hub repo (``marker``: a file
    every such repo has) and the Hub cannot be used (offline mode, or no connection)."""
    if Path(name).exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, marker), str):
        return
    fix = (
        "use a local directory, a packaged teacher ('offline-minilm', 'offline-mpnet'), or a machine that reaches "
        "the Hub"
    )
    if constants.HF_HUB_OFFLINE:
        raise OSError(
            f"cannot load {what} {name!r}: HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
            f"cache; {fix} (with HF_HUB_OFFLINE unset)"
        )
    if not hub_reachable():
        raise OSError(
            f"cannot load {what} {name!r}: it is not in the local Hugging Face cache and the Hub "
            f"({hub_host()}) cannot be reached; {fix}"
        )
