"""Is the Hugging Face hub reachable? Answered in seconds, so offline work fails at once instead of after retries."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Tell huggingface_hub/datasets/transformers not to try the network (call once the hub is known unreachable)."""
    for v in OFFLINE_VARS:
        os.environ[v] = "1"
