"""ASGI middleware for a vLLM server started with an API key: every route but ``/health`` needs
``Authorization: Bearer <key>`` (the key in ``$VLLM_API_KEY``). Standalone: imports nothing from llmcompress, since
it runs inside the vLLM environment, where ``VLLMServer`` makes it importable as ``llmcompress_vllm_auth`` and
passes ``--middleware llmcompress_vllm_auth.RequireKey``.

Why: vLLM's own ``--api-key`` guards ``/v1``, ``/v2``, ``/inference`` and ``/cohere`` only. Measured on vLLM 0.32.0
with the key set: ``POST /invocations`` (its SageMaker route) generated text without the key, and ``/tokenize``,
``/metrics``, ``/load`` and ``/version`` answered anyone.
"""

import hashlib
import json
import os
import secrets

#: Routes that answer without the key: liveness only (load balancers and our readiness check).
OPEN = ("/health",)


class RequireKey:
    def __init__(self, app):
        self.app = app
        self.digest = hashlib.sha256(os.environ["VLLM_API_KEY"].encode()).digest()

    def _allowed(self, scope) -> bool:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path in OPEN or scope.get("method") == "OPTIONS":  # CORS preflights carry no credentials
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = hashlib.sha256(token.encode("latin-1")).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(given, self.digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = json.dumps({"error": "Unauthorized"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
