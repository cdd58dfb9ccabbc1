"""Building blocks of the comparison app (``app.py``, ``llmcompress app``): a model pool loaded once, parallel
streaming chat, a throughput race, a report browser, and the limits that keep a public deployment safe.

``build_app(pool, config)`` (``llmcompress.ui.app``) returns the ``gr.Blocks``; ``llmcompress.ui.launch.main`` parses
arguments and launches it. Importing this package does not import gradio or torch.
"""
