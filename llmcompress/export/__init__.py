"""The export stage: write the compressed model so that its natural consumer loads it unchanged, plus a model card.

One file per format, registered here by name (adding a format = one file + one line below)::

    hf                  transformers `from_pretrained` (bnb, gptq, torchao int8, compressed-tensors, dense folders)
    compressed-tensors  transformers and vLLM (`pack-quantized`): from rtn and gptq, or copied from llmc-* methods
    gguf                llama.cpp and transformers `gguf_file=`: the dequantized model as f16, bf16 or q8_0
"""

from __future__ import annotations

from ..registry import Registry

EXPORT_FORMATS: Registry = Registry("export format")
EXPORT_FORMATS.register_lazy("hf", "llmcompress.export.hf:HFExporter")
EXPORT_FORMATS.register_lazy("compressed-tensors", "llmcompress.export.compressed_tensors:CompressedTensorsExporter")
EXPORT_FORMATS.register_lazy("gguf", "llmcompress.export.gguf:GGUFExporter")


def refresh_cards(report: dict) -> list[str]:
    """Rewrite the model card of every export of a finished run with the final report's figures."""
    from .card import refresh_cards as _refresh

    return _refresh(report)


def push_exports(run_dir, report: dict, console=None) -> list[str]:
    """Push every export of a finished run that has ``push_to_hub:`` (model, card, report) to the hub."""
    from .hub import push_exports as _push

    return _push(run_dir, report, console)
