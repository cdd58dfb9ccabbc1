"""Is the Hugging Face hub reachable? Answered in seconds, so offline work fails at once instead of after retries.

The hub is huggingface_hub's ``constants.ENDPOINT`` (``HF_ENDPOINT``: a mirror or a local stand-in), reached through
``HTTPS_PROXY`` / ``HTTP_PROXY`` when one is set (then the proxy is what must answer, not the hub directly).
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline(datasets: bool = False) -> bool:
    """True when the user switched the hub off: only the local cache may be used. Models: HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE, as huggingface_hub reads it); datasets (``datasets=True``): HF_DATASETS_OFFLINE too."""
    names = OFFLINE_VARS if datasets else ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in names)


def hub_endpoint() -> str:
    """The hub URL huggingface_hub talks to (HF_ENDPOINT, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 2.0, datasets: bool = False) -> bool:
    """May we download from the hub now: not switched off (see ``hub_offline``), and its endpoint answers."""
    if hub_offline(datasets):
        return False
    return _reachable(hub_endpoint(), timeout)


def _reachable(url: str, timeout: float) -> bool:
    """A TCP connection to the host of ``url``, or to the proxy that requests for ``url`` go through."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(parts.scheme)
    if proxy:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return _connects(host, port, timeout)


@lru_cache(maxsize=8)
def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Tell huggingface_hub/datasets/transformers not to try the network (call once the hub is known unreachable)."""
    for v in OFFLINE_VARS:
        os.environ[v] = "1"
