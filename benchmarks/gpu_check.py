"""Issue 16's GPU figures on random-weight 1B/8B-shaped llamas (built from a config on the GPU: nothing is downloaded).

One process, each part in its own try/except; one JSON line per measurement on stdout, and everything so far in
``$OUT/gpu_check.json`` after each part. Parts (``GPU_CHECK_PARTS``, comma-separated, default all, in this order):

  env          torch / CUDA / GPU / free memory
  1b, 8b       per shape: bf16 decode tok/s at batch 1 and 64 (greedy, 128-token random prompt, 64 new tokens);
               NF4 by bitsandbytes (in-memory Linear4bit replacement: ``Params4bit._quantize`` per nn.Linear, the
               lm_head left bf16, double quant off as in transformers' default); its memory and decode tok/s;
               QLoRA step time (peft LoRA r=16 on q/k/v/o/gate/up/down, batch 4 x 512, bf16 compute, AdamW,
               gradient checkpointing; median of 5 steps after 2 warm-up; peak memory)
  gptq-1b, awq-1b, gptq-8b, awq-8b
               llmcompressor ``oneshot`` W4A16 (group 64, symmetric; GPTQ actorder static, dampening 0.01; AWQ n_grid 20
               duo scaling + QuantizationModifier), 64 x 512 random-token calibration sequences: wall time, peak memory

``GPU_CHECK_BUDGET_S`` (default 360): a part whose estimated cost no longer fits is skipped and recorded as skipped.
``GPU_CHECK_DEVICE=cpu`` with ``GPU_CHECK_TINY=1`` runs the same code on tiny shapes (a syntax/API check off the GPU).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback

T0 = time.perf_counter()
OUT = os.environ.get("OUT") or "."
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "360"))
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
PARTS = [p for p in os.environ.get("GPU_CHECK_PARTS", "env,1b,gptq-1b,8b,awq-1b,gptq-8b,awq-8b").split(",") if p]
# Rough cost of each part on an H200 (seconds), to skip a part that would not finish inside the budget.
COST = {"env": 5, "1b": 45, "8b": 90, "gptq-1b": 60, "awq-1b": 90, "gptq-8b": 150, "awq-8b": 240}
# A part still running after this many seconds is interrupted (SIGALRM -> TimeoutError), so the next one still runs.
LIMIT = {"env": 60, "1b": 120, "8b": 150, "gptq-1b": 120, "awq-1b": 150, "gptq-8b": 200, "awq-8b": 240}

RECORDS: list[dict] = []

SHAPES = {
    # SmolLM2-1.7B's shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    # Llama-3-8B's shape
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=2048,
               rope_theta=500000.0),
}
if TINY:
    SHAPES = {k: dict(v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2 if k == "1b" else 1, vocab_size=512) for k, v in SHAPES.items()}

PROMPT, NEW = (128, 64) if not TINY else (16, 8)
BATCHES = (1, 64) if not TINY else (1, 4)
LORA_BATCH, LORA_SEQ = (4, 512) if not TINY else (2, 32)
CAL_N, CAL_SEQ = (64, 512) if not TINY else (4, 32)


def emit(rec: dict) -> None:
    rec = {"t_s": round(time.perf_counter() - T0, 1), **rec}
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def save() -> None:
    try:
        with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
            json.dump(RECORDS, f, indent=1)
    except OSError as e:  # pragma: no cover
        print(f"could not write gpu_check.json: {e}", file=sys.stderr, flush=True)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def mem() -> dict:
    import torch

    if DEVICE != "cuda":
        return {}
    return {"allocated_gib": gib(torch.cuda.memory_allocated()), "peak_gib": gib(torch.cuda.max_memory_allocated())}


def reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free() -> None:
    import torch

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------


def part_env() -> None:
    import platform

    import torch

    rec = {"part": "env", "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": DEVICE}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        free_b, total_b = torch.cuda.mem_get_info()
        rec.update(gpu=props.name, capability=list(torch.cuda.get_device_capability()), sms=props.multi_processor_count,
                   free_gib=gib(free_b), total_gib=gib(total_b))
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "llmcompressor", "compressed_tensors",
                 "datasets", "pydantic", "vllm"):
        try:
            mod = __import__(name)
            rec[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            rec[name] = f"not importable: {type(e).__name__}: {str(e)[:120]}"
    emit(rec)


def build(shape: str):
    """A random-weight llama of ``shape`` in bf16, built and initialised directly on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    t = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # explicit N(0, 0.02) init on the device (whatever transformers' init did or skipped)
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, always NEW tokens
    model.generation_config.pad_token_id = 0
    sync()
    n = sum(p.numel() for p in model.parameters())
    return model, {"params_b": round(n / 1e9, 3), "build_s": round(time.perf_counter() - t, 2),
                   "dtype": str(next(model.parameters()).dtype)}


def decode(model, batch: int) -> dict:
    """Greedy generate NEW tokens from a PROMPT-token random prompt at ``batch``; output tok/s, with the prefill."""
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, PROMPT), generator=g).to(DEVICE)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        sync()
        t = time.perf_counter()
        model(ids)
        sync()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
        sync()
        total = time.perf_counter() - t
    new = out.shape[1] - PROMPT
    return {"batch": batch, "prompt": PROMPT, "new_tokens": new, "generate_s": round(total, 3),
            "prefill_s": round(prefill, 4), "output_tok_s": round(batch * new / total, 1),
            "decode_tok_s": round(batch * (new - 1) / max(total - prefill, 1e-9), 1),
            "ms_per_step": round(1000 * (total - prefill) / max(new - 1, 1), 2)}


def to_nf4(model) -> dict:
    """Every nn.Linear but lm_head -> bnb Linear4bit NF4 (blocksize 64, no double quant, bf16 compute), in place."""
    import bitsandbytes as bnb
    import torch

    t = time.perf_counter()
    n = 0
    for _name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child_name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
            w = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64, compress_statistics=False,
                                  quant_type="nf4", quant_storage=torch.uint8, module=q)
            q.weight = w._quantize(DEVICE)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
            child.weight = None
            n += 1
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its bnb LoRA layers
    sync()
    secs = time.perf_counter() - t
    free()
    return {"quantize_s": round(secs, 2), "linear4bit_layers": n,
            "how": "in-memory: bnb.nn.Params4bit._quantize per nn.Linear (lm_head kept bf16)"}


def qlora(model) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, cfg)
    wrapped = sum(1 for m in pm.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A"))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    for p in pm.parameters():  # LoRA weights in fp32 (peft's default already), compute in bf16 autocast
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    pm.train()
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (LORA_BATCH, LORA_SEQ), generator=g).to(DEVICE)
    reset_peak()
    times, losses = [], []
    for _i in range(7):
        sync()
        t = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss.detach()), 4))
    steady = times[2:]
    return {"lora_r": 16, "lora_wrapped_linear4bit": wrapped, "trainable_m": round(trainable / 1e6, 2),
            "batch": LORA_BATCH, "seq": LORA_SEQ, "step_s_median": round(statistics.median(steady), 4),
            "step_s_all": [round(x, 4) for x in times], "tokens_per_s": round(LORA_BATCH * LORA_SEQ /
                                                                             statistics.median(steady), 1),
            "loss_first_last": [losses[0], losses[-1]], **({"peak_gib": mem()["peak_gib"]} if DEVICE == "cuda" else {})}


def part_shape(shape: str) -> None:
    model, info = build(shape)
    emit({"part": shape, "what": "build-bf16", **info, **mem()})
    save()
    for b in BATCHES:
        try:
            emit({"part": shape, "what": "decode-bf16", **decode(model, b), **mem()})
        except Exception as e:  # noqa: BLE001
            emit({"part": shape, "what": "decode-bf16", "batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
            free()
        save()
    before = mem().get("allocated_gib")
    try:
        info = to_nf4(model)
    except Exception as e:  # noqa: BLE001
        emit({"part": shape, "what": "quantize-nf4", "error": f"{type(e).__name__}: {e}"[:500],
              "trace": traceback.format_exc()[-1500:]})
        return
    emit({"part": shape, "what": "quantize-nf4", **info, "allocated_before_gib": before, **mem()})
    save()
    for b in BATCHES:
        try:
            emit({"part": shape, "what": "decode-nf4", **decode(model, b), **mem()})
        except Exception as e:  # noqa: BLE001
            emit({"part": shape, "what": "decode-nf4", "batch": b, "error": f"{type(e).__name__}: {e}"[:500],
                  "trace": traceback.format_exc()[-1500:]})
            free()
        save()
    try:
        emit({"part": shape, "what": "qlora-step", **qlora(model)})
    except Exception as e:  # noqa: BLE001
        emit({"part": shape, "what": "qlora-step", "error": f"{type(e).__name__}: {e}"[:500],
              "trace": traceback.format_exc()[-1500:]})
    del model
    free()


def tokenizer(vocab: int):
    """A stand-in tokenizer (word level, ids as words): llmcompressor wants a processor next to a dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0", pad_token="0", bos_token="1", eos_token="2")


def part_llmc(method: str, shape: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if method == "gptq":
        recipe = [GPTQModifier(targets=["Linear"], ignore=["lm_head"], config_groups=groups, actorder="static",
                               dampening_frac=0.01)]
    else:
        recipe = [AWQModifier(n_grid=20, duo_scaling=True),
                  QuantizationModifier(targets=["Linear"], ignore=["lm_head"], config_groups=groups)]
    model, info = build(shape)
    # oneshot re-reads the model's config from model.config.name_or_path: give it a folder holding config.json
    import tempfile

    cfg_dir = tempfile.mkdtemp(prefix=f"gpu_check_{shape}_")
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (CAL_N, CAL_SEQ), generator=g)
    ds = Dataset.from_list([{"input_ids": r.tolist(), "attention_mask": [1] * CAL_SEQ} for r in ids])
    reset_peak()
    t = time.perf_counter()
    try:
        oneshot(model=model, tokenizer=tokenizer(model.config.vocab_size), recipe=recipe, dataset=ds,
                num_calibration_samples=CAL_N, max_seq_length=CAL_SEQ, shuffle_calibration_samples=False)
        sync()
        secs = time.perf_counter() - t
    finally:
        active_session().reset()
    qw = [m for m in model.modules() if hasattr(m, "weight_scale")]
    emit({"part": f"{method}-{shape}", "what": f"llmcompressor-{method}-w4a16", "oneshot_s": round(secs, 1),
          "calibration": f"{CAL_N}x{CAL_SEQ} random tokens", "quantized_modules": len(qw),
          "model_device": str(next(model.parameters()).device), **info, **mem()})
    del model
    free()


def _alarm(signum, frame):
    raise TimeoutError("part interrupted: over its time limit")


def main() -> int:
    import signal

    signal.signal(signal.SIGALRM, _alarm)
    for part in PARTS:
        left = BUDGET - (time.perf_counter() - T0)
        if COST.get(part, 30) > left and part != "env":
            emit({"part": part, "skipped": f"time: {left:.0f} s left of the {BUDGET:.0f} s budget, "
                                           f"part estimated at {COST.get(part, 30)} s"})
            save()
            continue
        t = time.perf_counter()
        limit = int(max(5, min(LIMIT.get(part, 120), left)))
        # What is still allocated when a part starts: on the H200 each llmcompressor part left its whole model
        # allocated after `del model` (2026-12-04), which inflates later parts' allocated/peak figures by this much.
        at_start = mem().get("allocated_gib")
        signal.alarm(limit)
        try:
            if part == "env":
                part_env()
            elif part in SHAPES:
                part_shape(part)
            elif "-" in part:
                method, shape = part.split("-", 1)
                part_llmc(method, shape)
            else:
                raise ValueError(f"unknown part {part}")
        except Exception as e:  # noqa: BLE001
            emit({"part": part, "error": f"{type(e).__name__}: {e}"[:800], "trace": traceback.format_exc()[-2500:]})
        finally:
            signal.alarm(0)
            free()
        emit({"part": part, "what": "part-wall", "limit_s": limit, "allocated_at_start_gib": at_start,
              "allocated_at_end_gib": mem().get("allocated_gib"), "wall_s": round(time.perf_counter() - t, 1)})
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
