"""The sweep executors registry: ``local`` and ``ray``, imported on first use."""

from __future__ import annotations

from ..registry import Registry

EXECUTORS: Registry = Registry("sweep executor")
EXECUTORS.register_lazy("local", "llmcompress.sweep.local:LocalExecutor")
EXECUTORS.register_lazy("ray", "llmcompress.sweep.ray_executor:RayExecutor")
