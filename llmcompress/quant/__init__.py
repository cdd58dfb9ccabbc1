"""The quantize stage. Each method is one file: a public ``XxxConfig`` (a stage config with ``method: Literal[...]``)
plus a private implementation, registered here by name. Adding a method = one new file + one line below."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ..registry import Registry

QUANTIZERS: Registry = Registry("quantization method")
QUANTIZERS.register_lazy("rtn", "llmcompress.quant.rtn:RTNConfig")
QUANTIZERS.register_lazy("bnb-nf4", "llmcompress.quant.bnb:BnbNF4Config")
QUANTIZERS.register_lazy("bnb-fp4", "llmcompress.quant.bnb:BnbFP4Config")
QUANTIZERS.register_lazy("bnb-int8", "llmcompress.quant.bnb:BnbInt8Config")
QUANTIZERS.register_lazy("gptq", "llmcompress.quant.gptq:GPTQConfig")
QUANTIZERS.register_lazy("hqq", "llmcompress.quant.hqq:HQQConfig")
QUANTIZERS.register_lazy("torchao-int8wo", "llmcompress.quant.torchao:TorchaoInt8WeightOnlyConfig")
QUANTIZERS.register_lazy("torchao-int8dq", "llmcompress.quant.torchao:TorchaoInt8DynamicConfig")
QUANTIZERS.register_lazy("torchao-int4wo", "llmcompress.quant.torchao:TorchaoInt4WeightOnlyConfig")
QUANTIZERS.register_lazy("llmc-gptq-w4a16", "llmcompress.quant.llmcompressor:LlmcGPTQConfig")
QUANTIZERS.register_lazy("llmc-awq-w4a16", "llmcompress.quant.llmcompressor:LlmcAWQConfig")
QUANTIZERS.register_lazy("llmc-w8a8", "llmcompress.quant.llmcompressor:LlmcW8A8Config")
QUANTIZERS.register_lazy("llmc-fp8", "llmcompress.quant.llmcompressor:LlmcFP8Config")
QUANTIZERS.register_lazy("gguf", "llmcompress.llamacpp.quant:GGUFConfig")
QUANTIZERS.register_lazy("dynamic-int8", "llmcompress.quant.dynamic:DynamicInt8Config")
QUANTIZERS.register_lazy("codebook", "llmcompress.quant.codebook:CodebookConfig")

QuantizeStage = Annotated[
    Union[tuple(QUANTIZERS.get(name) for name in QUANTIZERS.names())], Field(discriminator="method")
]
