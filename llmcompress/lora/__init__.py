"""The ``lora`` stage: peft LoRA on the current (often quantized) model, trained by an objective, started by an
init, and handed on by a merge mode. Each choice is a registry entry written once here, imported on first use.

- objectives (``objective:``): ``sft`` (next-token loss on a dataset, responses only for chats), ``distill``
  (KL to the original model's next-token distribution: recovery from quantization, no labels).
- inits (``init:``): ``default`` (A random, B zero), ``loftq`` (the adapter starts at the best rank-r
  approximation of the quantization error; CPU path, no cuda), ``pissa`` (principal singular vectors; dense bases).
- merges (``merge:``): ``keep`` (adapter beside the quantized base), ``requantize`` (merge into the weights the
  quantize stage started from, quantize again with the same method), ``dequantized`` (merge into a dense copy of
  the dequantized base).
"""

from __future__ import annotations

from ..registry import Registry

OBJECTIVES: Registry = Registry("lora objective")
OBJECTIVES.register_lazy("sft", "llmcompress.lora.objectives:sft_loss")
OBJECTIVES.register_lazy("distill", "llmcompress.lora.objectives:distill_loss")

INITS: Registry = Registry("lora init")
INITS.register_lazy("default", "llmcompress.lora.init:init_default")
INITS.register_lazy("loftq", "llmcompress.lora.init:init_loftq")
INITS.register_lazy("pissa", "llmcompress.lora.init:init_pissa")

MERGES: Registry = Registry("lora merge mode")
MERGES.register_lazy("keep", "llmcompress.lora.merge:merge_keep")
MERGES.register_lazy("requantize", "llmcompress.lora.merge:merge_requantize")
MERGES.register_lazy("dequantized", "llmcompress.lora.merge:merge_dequantized")
