"""The prune stage. Each method is one file: a public ``XxxConfig`` (a stage config with ``method: Literal[...]``)
plus a private implementation, registered here by name. Adding a method = one new file + one line below."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ..registry import Registry

PRUNERS: Registry = Registry("pruning method")
PRUNERS.register_lazy("magnitude", "llmcompress.prune.magnitude:MagnitudeConfig")
PRUNERS.register_lazy("wanda", "llmcompress.prune.wanda:WandaConfig")
PRUNERS.register_lazy("sparsegpt", "llmcompress.prune.llmcompressor:SparseGPTConfig")
PRUNERS.register_lazy("llmc-wanda", "llmcompress.prune.llmcompressor:LlmcWandaConfig")
PRUNERS.register_lazy("structured", "llmcompress.vision.prune:StructuredConfig")
PRUNERS.register_lazy("width", "llmcompress.prune.width:WidthConfig")
PRUNERS.register_lazy("depth", "llmcompress.prune.depth:DepthConfig")
PRUNERS.register_lazy("lowrank", "llmcompress.prune.lowrank:LowRankConfig")

PruneStage = Annotated[Union[tuple(PRUNERS.get(name) for name in PRUNERS.names())], Field(discriminator="method")]
