"""``python -m llmcompress.evals`` prints the folder of the shipped lm-eval tasks (for ``lm_eval --include_path``)."""

from llmcompress.evals import path

print(path())
