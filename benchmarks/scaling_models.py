"""Random-weight models of real shapes, for measuring cost (time, memory) where quality does not matter.

    python benchmarks/scaling_models.py 1.7b /tmp/m-1.7b [--layers 4]

Weights are drawn from N(0, 0.02) in bfloat16, written with ``save_pretrained`` (safetensors shards), with the default
model's tokenizer (vocabulary 49,152; a larger model vocabulary just has rows no token reaches). ``--layers`` keeps the
shape of every layer but fewer of them, for shapes that do not fit this machine: cost per layer is then measured and
extrapolated.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

#: hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings (from each model's config.json)
SHAPES: dict[str, dict] = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-360M
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-1.7B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama-3-8B
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama-3-70B
}


def param_count(shape: dict, layers: int | None = None) -> int:
    """Parameters of a llama of ``shape`` (``layers`` overrides its layer count), norms included."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    n = layers if layers is not None else shape["num_hidden_layers"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def build(name: str, out: Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write the random model ``name`` (a key of SHAPES) with ``layers`` layers to ``out``; returns ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcompress.models import resolve_source
    from llmcompress.models.source import materialize
    from llmcompress.recipe import ModelSpec

    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    tok_dir = materialize(resolve_source(ModelSpec(source="smollm2-135m"), Path.cwd()))
    base = json.loads((tok_dir / "config.json").read_text())
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
                      pad_token_id=base["pad_token_id"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()  # to_empty unties the embeddings and lm_head of a tied model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = base["pad_token_id"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            shutil.copy2(tok_dir / f, tmp / f)
    n = sum(p.numel() for p in model.parameters())
    (tmp / "llmcompress.json").write_text(json.dumps(
        {"format": "hf", "role": "original", "source": f"random-{name}" + (f"-{layers}l" if layers else ""),
         "params": n}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{out}: {n / 1e9:.3f} B parameters, built in {time.perf_counter() - t0:.1f} s")
    return out


def main(name: str = typer.Argument(..., help=f"one of {', '.join(SHAPES)}"), out: Path = typer.Argument(...),
         layers: int = typer.Option(None, help="keep each layer's shape, but this many layers")) -> None:
    build(name, out, layers)


if __name__ == "__main__":
    typer.run(main)
