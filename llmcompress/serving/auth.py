"""Who may use a served model: the API key a vLLM server requires (``serve --api-key``, ``$LLMCOMPRESS_API_KEY``,
``$VLLM_API_KEY``), the header our own clients send with it, and the warning for a server that listens beyond this
machine without one.

A server with a key wants it (``Authorization: Bearer KEY``) on every route but ``/health`` (what readiness checks
and load balancers use): vLLM's own check covers ``/v1`` and a few other prefixes only, so ``VLLMServer`` adds
``vllm_auth.RequireKey`` for the rest.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping

from ..errors import LLMCompressError

#: Where ``serve`` finds the key when ``--api-key`` is not given, first match wins (vLLM itself reads the second).
API_KEY_ENV = ("LLMCOMPRESS_API_KEY", "VLLM_API_KEY")
KEY_FIX = "Fix: use a key of letters, digits and punctuation, e.g. `--api-key $(openssl rand -hex 16)`."


def api_key_of(value: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key a server should require: ``value`` (``--api-key``), else the first of ``API_KEY_ENV`` that is set;
    None for no key. Raises LLMCompressError (never quoting the key) when it could not travel in an HTTP header."""
    environ = os.environ if environ is None else environ
    source = "--api-key"
    if value is None:
        source, value = next(((f"${n}", environ[n]) for n in API_KEY_ENV if environ.get(n)), (None, None))
        if value is None:
            return None
    if not value:
        raise LLMCompressError(f"serve: {source} is empty. {KEY_FIX}")
    if not all(33 <= ord(c) <= 126 for c in value):  # visible ASCII: a space, newline or non-ASCII breaks the header
        raise LLMCompressError(f"serve: {source} holds a space, a control or a non-ASCII character, which an HTTP "
                               f"`Authorization` header cannot carry. {KEY_FIX}")
    return value


def bearer(api_key: str | None) -> dict[str, str]:
    """The headers a client sends to a server that requires ``api_key`` (none when it requires none)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def check_host(host: str) -> bool:
    """Whether ``host`` is loopback only (reachable from this machine alone). Raises LLMCompressError with the fix
    when it names no address this machine can listen on."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LLMCompressError(f"serve: --host {host}: not a name or address this machine knows ({e}). Fix: use "
                               "127.0.0.1 (this machine only, the default) or 0.0.0.0 (every interface).") from None
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address[0], 0))
        except OSError as e:
            raise LLMCompressError(f"serve: --host {host}: cannot listen on {address[0]} ({e.strerror or e}). Fix: "
                                   "use an address of this machine, 127.0.0.1 (the default) or 0.0.0.0.") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """What to tell the operator of a server on ``host`` (None when it listens on loopback only)."""
    if check_host(host):
        return None
    if api_key is None:
        where = f"port {port}" if port else "its port"
        return (f"--host {host} makes the API reachable from other machines, and it has no API key: anyone who can "
                f"reach {where} can use the model. Fix: pass --api-key KEY (or set $LLMCOMPRESS_API_KEY; clients "
                "then send `Authorization: Bearer KEY`), or bind 127.0.0.1 (the default).")
    return (f"--host {host}: the API is reachable from other machines and requires the API key (every route but "
            "/health); the key travels in clear text over HTTP, so beyond a trusted network put a TLS proxy in front.")
