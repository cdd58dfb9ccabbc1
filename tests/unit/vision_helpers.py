"""Shared by the vision tests: a RunContext on a tiny vision model folder, and a tiny random Llava."""

from __future__ import annotations

from pathlib import Path


def vision_ctx(tmp_path: Path, model_dir: Path, stages: list[dict], compressed: Path | None = None, **recipe_kw):
    """A RunContext on ``model_dir`` (fp32, 1 thread), ``stages`` validated as a recipe."""
    from llmcompress.context import ModelHandle, RunContext, Runtime
    from llmcompress.recipe import load_recipe

    recipe = load_recipe({"name": "v", "model": str(model_dir), "threads": 1, "dtype": "float32", "stages": stages,
                          **recipe_kw})
    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    runtime.apply()
    original = ModelHandle("original", model_dir, runtime)
    current = ModelHandle("compressed", compressed, runtime) if compressed else original
    stage_dir = tmp_path / "run" / "01-stage"
    stage_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(recipe=recipe, run_dir=tmp_path / "run", runtime=runtime, original=original,
                      current=current, stage_dir=stage_dir)


def digits_pixels(model_dir: Path, n: int = 16):
    """Pixel values of ``n`` test digits through the folder's processor."""
    from llmcompress.models.loading import load_model
    from llmcompress.vision.bench import batch_inputs

    model, processor = load_model(model_dir, "cpu", "float32")
    return batch_inputs(model, processor, [n])[n]


def tiny_llava(path: Path) -> Path:
    """A tiny random LlavaForConditionalGeneration (CLIP vision tower + projector + 2-layer llama), with the tiny
    llama's tokenizer; saved as transformers 5 saves it (legacy checkpoint key names)."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llmcompress.models.tiny import tiny_random_llama

    tok = AutoTokenizer.from_pretrained(tiny_random_llama())
    text = LlamaConfig(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tok))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path
