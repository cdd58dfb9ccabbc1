"""Benchmarks: size, memory, time to first token and decode speed, original and compressed interleaved."""
