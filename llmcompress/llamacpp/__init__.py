"""llama.cpp as a method and a runtime: GGUF quantization by its own tools (``quant``), GGUF folders evaluated on its
logits (``model``), timed and chatted with through llama-server (``backend``), built once by ``setup llamacpp``
(``runtime``)."""
