"""``format: gguf``: one ``model.gguf`` for llama.cpp (and transformers' ``gguf_file=``), llama architecture only.

A re-export of the *dequantized* model: every quantized layer's weights as the run computed with them, then written
as f16, bf16 or q8_0 (gguf-py's numpy quantizer) with tensor names and metadata as llama.cpp's
``convert_hf_to_gguf.py`` writes them for llama (q/k rows permuted to llama.cpp's rope layout, tied ``output``
omitted, norms in f32). It is not llama.cpp's k-quants of the original: a q8_0 GGUF of a 4-bit model carries both
roundings, and an f16 one is four times the 4-bit size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LLMCompressError, require
from .base import LAYOUT_KEYS, Exporter, dense_copy, reload_check, write_meta

if TYPE_CHECKING:
    from ..context import RunContext
    from .stage import ExportStage

FILE = "model.gguf"


class GGUFExporter(Exporter):
    consumer = "llama.cpp, and transformers AutoModelForCausalLM.from_pretrained(folder, gguf_file='model.gguf')"
    library = "gguf"

    def check(self, stage: "ExportStage", quantize: Any) -> str | None:
        if quantize is not None and getattr(quantize, "method", None) == "gguf" and stage.gguf_type is not None:
            return (f"the model is already a {quantize.gguf_type} GGUF file, so `gguf_type: {stage.gguf_type}` would "
                    "re-round it. Fix: remove `gguf_type` (the file is exported as it is), or set the type in the "
                    "quantize stage.")
        return None

    def export(self, stage: "ExportStage", ctx: "RunContext", out: Path) -> dict[str, Any]:
        if ctx.current.meta.get("format") == "gguf":  # llama.cpp's own file (method gguf): exported as it is
            return _copy_gguf(ctx, out)
        if ctx.current.meta.get("format") == "peft":  # base + LoRA (merge: keep): base GGUF + GGUF LoRA adapter
            return _export_lora(stage, ctx, out)
        require("gguf", "all", "`format: gguf`")
        kind = stage.gguf_type or "f16"
        model, tokenizer = dense_copy(ctx)
        if model.config.model_type != "llama":
            raise LLMCompressError(
                f"gguf export writes llama-architecture models only; this one is `{model.config.model_type}`. "
                "Fix: use `format: hf` or `compressed-tensors`."
            )
        tokenizer.save_pretrained(out)  # gguf-py reads merges and special tokens from the folder
        pre = _source_pre_tokenizer(ctx)
        counts = write_llama_gguf(model, tokenizer, out, kind, name=ctx.recipe.name, pre=pre)
        for f in out.iterdir():  # keep only the GGUF (tokenizer files were scaffolding)
            if f.name != FILE:
                f.unlink()
        meta = {k: v for k, v in ctx.current.meta.items() if k not in ("format", "versions", *LAYOUT_KEYS)}
        write_meta(out, {"format": "gguf", "file": FILE, **meta},
                   {"format": "gguf", "gguf_type": kind, "from": str(ctx.current.path), "tensor_types": counts})
        rounding = ("q8_0 adds its own 8-bit rounding on top of the method's" if kind == "q8_0"
                    else f"{kind} holds the dequantized weights")
        caveats = [
            f"A re-export of the dequantized model, not llama.cpp's own quantization of the original: {rounding}, "
            "and the file is larger than a 4-bit folder.",
            "Tokenizer written from the Hugging Face tokenizer (gpt2-style BPE); llama.cpp's pre-tokenizer "
            f"`tokenizer.ggml.pre` is `{pre}`"
            + (" (copied from the original's GGUF)." if pre != "default" else
               " (llama.cpp's generic split: check its tokenization matches for this model)."),
        ]
        return {"files": sorted(p.name for p in out.iterdir()), "gguf_type": kind, "tensor_types": counts,
                "caveats": caveats}

    def verify(self, stage: "ExportStage", ctx: "RunContext", out: Path, info: dict) -> dict[str, Any]:
        """llama.cpp in a fresh process (when set up) against the evaluated model; for a re-export of a transformers
        model also transformers' own GGUF loader."""
        llamacpp = None
        if info.get("adapter"):
            from ..llamacpp.check import check_lora

            model, tokenizer = ctx.current.load()
            return check_lora(out / FILE, out / info["adapter"], model, _BaseOf(model), tokenizer,
                              ctx.runtime.threads)
        try:
            from ..llamacpp.check import check_file

            model, tokenizer = ctx.current.load()
            llamacpp = check_file(out / FILE, model, tokenizer, ctx.runtime.threads)
        except LLMCompressError as e:
            if ctx.current.meta.get("format") == "gguf" or "setup llamacpp" not in str(e):
                raise
            ctx.log(f"export gguf: not checked in llama.cpp ({e})")
        if ctx.current.meta.get("format") == "gguf":
            return llamacpp
        check = reload_check(ctx, f"AutoModelForCausalLM.from_pretrained(folder, gguf_file={FILE!r}, dtype=dtype)",
                             out)
        return {**check, **({"llamacpp": llamacpp} if llamacpp else {})}

    def load_code(self, folder: str, info: dict) -> str:
        lora = f" --lora {folder}/{info['adapter']}" if info.get("adapter") else ""
        adapter = f"\\nADAPTER ./{info['adapter']}" if info.get("adapter") else ""
        return (
            "# llama.cpp (chat in the terminal; llama-server serves an OpenAI API)\n"
            f"#   llama-cli -m {folder}/{FILE}{lora} -cnv\n"
            f"#   llama-server -m {folder}/{FILE}{lora} --port 8080\n"
            "# Ollama\n"
            f"#   cd {folder} && printf 'FROM ./{FILE}{adapter}\\n' > Modelfile && ollama create my-model -f Modelfile"
            " && ollama run my-model\n"
            "# transformers (dequantizes to dense)\n"
            "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="{FILE}", dtype=torch.bfloat16)\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}", gguf_file="{FILE}")'
        )


def _copy_gguf(ctx: "RunContext", out: Path) -> dict[str, Any]:
    import shutil

    from ..llamacpp.model import gguf_file

    src = gguf_file(ctx.current.path)
    shutil.copy2(src, out / FILE)
    meta = {k: v for k, v in ctx.current.meta.items() if k not in ("versions", *LAYOUT_KEYS)}
    kind = ctx.current.meta.get("gguf_type", "gguf")
    write_meta(out, {**meta, "format": "gguf", "file": FILE}, {"format": "gguf", "gguf_type": kind,
                                                                "from": str(ctx.current.path)})
    return {"files": sorted(p.name for p in out.iterdir()), "gguf_type": kind,
            "caveats": [f"llama.cpp's own {kind} file, as the quantize stage made it (exported unchanged)."]}


class _BaseOf:
    """Calls a peft model with its adapter switched off (the base the adapter was trained on)."""

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


ADAPTER = "adapter.gguf"


def _export_lora(stage: "ExportStage", ctx: "RunContext", out: Path) -> dict[str, Any]:
    """The base as llama.cpp's converter writes it, and the adapter as its convert_lora_to_gguf.py does."""
    from ..llamacpp.convert import dense_format, lora_to_gguf, to_gguf

    base = ctx.current.path / "base"
    if dense_format(base) is not None:
        raise LLMCompressError(
            "gguf export of a LoRA adapter needs a dense base (llama.cpp applies the adapter to its own weights), "
            "and this adapter sits on a quantized one. Fix: merge it (`merge: dequantized`) and export the merged "
            "model, or train the adapter on the dense model and quantize with `method: gguf` afterwards."
        )
    kind = stage.gguf_type or "f16"
    to_gguf(base, out / FILE, kind, log_path=ctx.stage_dir / "convert.log")
    lora_to_gguf(ctx.current.path, base, out / ADAPTER, "f16", log_path=ctx.stage_dir / "convert_lora.log")
    meta = {k: v for k, v in ctx.current.meta.items() if k not in ("format", "versions", "base", *LAYOUT_KEYS)}
    write_meta(out, {**meta, "format": "gguf", "file": FILE, "adapter": ADAPTER},
               {"format": "gguf", "gguf_type": kind, "adapter": ADAPTER, "from": str(ctx.current.path)})
    return {"files": sorted(p.name for p in out.iterdir()), "gguf_type": kind, "adapter": ADAPTER,
            "caveats": [f"The base as {kind} GGUF and the LoRA adapter as a GGUF adapter (llama.cpp's converters); "
                        "llama.cpp applies it at run time (`--lora`), unmerged, as transformers+peft did."]}


def _source_pre_tokenizer(ctx: "RunContext") -> str:
    """llama.cpp's pre-tokenizer name from the original's GGUF when the original came from one, else "default"
    (llama.cpp picks it by hashing the tokenizer's output, which gguf-py cannot do)."""
    source = str(ctx.original.meta.get("source", ""))
    if not source.startswith("gguf:") or not Path(source[5:]).is_file():
        return "default"
    import gguf

    field = gguf.GGUFReader(source[5:]).get_field("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else "default"


def write_llama_gguf(model, tokenizer, out: Path, kind: str, name: str, pre: str = "default") -> dict[str, int]:
    """Write ``out/model.gguf`` from a dense llama ``model``; return {tensor type: count}."""
    import gguf
    import numpy as np

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer = gguf.GGUFWriter(str(out / FILE), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, out, cfg.vocab_size, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LLMCompressError(f"gguf export: no llama.cpp name for tensor `{hf_name}`")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_head, n_kv)
        qtype = _tensor_type(data, kind)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(new, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new, data.astype(np.float16))
        else:
            writer.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def _tensor_type(data, kind: str):
    """llama.cpp's choice: 1-D tensors (norms) f32; 2-D in the asked type, f16 when rows do not fit q8_0 blocks."""
    import gguf

    if data.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if kind == "bf16":
        return gguf.GGMLQuantizationType.BF16
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _permute(w, n_head: int, n_head_kv: int):
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rope layout (convert_hf_to_gguf's ``permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer, tokenizer, folder: Path, vocab_size: int, pre: str) -> None:
    """gpt2-style BPE vocabulary, merges, special token ids and chat template (as convert_hf_to_gguf's
    ``_set_vocab_gpt2``)."""
    import gguf

    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = tokenizer.convert_ids_to_tokens(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tok)
        is_special = i in special or (i in added and tokenizer.added_tokens_decoder[i].special)
        types.append(gguf.TokenType.CONTROL if is_special
                     else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab = gguf.SpecialVocab(str(folder), load_merges=True, n_vocab=vocab_size)
    vocab.add_to_gguf(writer)
