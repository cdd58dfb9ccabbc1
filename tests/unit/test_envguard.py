"""A lora stage must not move the process's Hugging Face cache (tokenicer, imported through peft -> gptqmodel, sets
HF_HOME=/tmp/tokenicer_hf_home when it is unset)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tokenicer")

PROBE = """
import json, os
from llmcompress.lora.init import wrap
from llmcompress.lora.stage import LoraStage
from llmcompress.models.loading import load_model
from llmcompress.models.tiny import tiny_random_llama

model, _ = load_model(tiny_random_llama(), "cpu", "float32")
wrap(model, LoraStage(type="lora", objective="sft", r=2, target_modules=["q_proj"],
                      data={"source": "builtin:pydoc", "samples": 8, "seq_len": 32}))
import gptqmodel  # what peft's dispatcher imports: it is there now, and it moved nothing
print(json.dumps({k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")}))
"""


def test_a_lora_wrap_leaves_the_hugging_face_cache_where_the_user_has_it():
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict.fromkeys(
        ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE"))
