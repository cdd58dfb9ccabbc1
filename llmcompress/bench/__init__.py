"""Benchmarks: size, memory, time to first token, decode speed and serving throughput, original and compressed
interleaved, under one or more generation backends (``llmcompress.backends``)."""
