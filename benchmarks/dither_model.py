"""The default model with its Q4_1 grid dithered away: a stand-in for a model that was never a 4-bit grid.

The default model's weights are dequantized from a Q4_1 GGUF, so q4_1/q5_1 re-find them exactly and any 4-bit figure
on it partly measures that history. Here every 32-wide block that holds Q4_1's 16 levels (within a tenth of a step:
the weights are stored in bf16) gets uniform noise of +-half its step, so its weights are continuous again; blocks
that are not on such a grid (the embedding) are left as they are. The result is a different, somewhat worse model:
compare methods on it against its own original, never against the default model.

    python benchmarks/dither_model.py benchmarks/runs/dithered
    python benchmarks/ladder.py --model benchmarks/runs/dithered --only gguf-q4_k_m,best --chat-limit 100
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompress.models.builtin import smollm2_135m

    src = smollm2_135m()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dithered = kept = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim != 2 or p.shape[1] % 32:
                continue
            blocks = p.reshape(-1, 32)
            lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
            step = ((hi - lo) / 15).clamp_min(1e-12)
            on_grid = ((blocks - (lo + torch.round((blocks - lo) / step) * step)).abs() <= 0.1 * step).all(1, True)
            p.copy_((blocks + (torch.rand_like(blocks) - 0.5) * step * on_grid).reshape(p.shape))
            dithered, kept = dithered + int(on_grid.sum()), kept + int((~on_grid).sum())
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    print(f"{out}: {dithered} blocks of 32 dithered, {kept} left as they were")


if __name__ == "__main__":
    app()
