"""GGUF -> dense safetensors folder, cached under the user cache dir (transformers dequantizes GGUF on load)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMCompressError, require
from ..utils.cache import cache_dir
from ..utils.io import atomic_dir, atomic_write_json, stable_hash


def check_readable(gguf: Path) -> None:
    """Parse the GGUF header and tensor table (gguf's own reader, a few seconds) before transformers tries to."""
    require("gguf", "all", "Loading a GGUF model")
    from gguf import GGUFReader

    try:
        GGUFReader(str(gguf))
    except Exception as e:  # noqa: BLE001 - a damaged file fails in numpy, struct or gguf: all mean the same here
        raise LLMCompressError(f"model: `{gguf}` is a damaged or truncated GGUF file ({type(e).__name__}: {e}). "
                               "Fix: download or convert it again.") from None


#: Bump when the dense folder's layout changes (2: byte-level BPE tokenizer.json as the model's authors ship it).
_LAYOUT = 2


def dense_from_gguf(gguf: Path, name: str | None = None, note: str | None = None) -> Path:
    """Convert a GGUF file into a bf16 `save_pretrained` folder once; return the cached folder."""
    gguf = Path(gguf)
    st = gguf.stat()
    key = stable_hash([str(gguf.resolve()), st.st_size, int(st.st_mtime), _LAYOUT], 12)
    target = cache_dir("models", f"{name or gguf.stem}-{key}")
    if (target / "llmcompress.json").is_file():
        return target
    require("gguf", "all", "Loading a GGUF model")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_readable(gguf)
    with atomic_dir(target, replace=False) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.bfloat16)
        except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
            raise LLMCompressError(f"model: transformers cannot load `{gguf}` ({type(e).__name__}: {e}). Fix: "
                                   "use a GGUF of an architecture transformers reads (llama, mistral, qwen2, ...), "
                                   "or the original save_pretrained folder.") from None
        if getattr(model, "hf_quantizer", None) is not None:
            # The GGUF "quantizer" only marks the weights as dequantized; it must go before save_pretrained.
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _plain_byte_level(tmp / "tokenizer.json")
        atomic_write_json(
            tmp / "llmcompress.json",
            {"format": "hf", "role": "original", "source": f"gguf:{gguf}",
             "note": note or f"dequantized from {gguf.name}"},
        )
    return target


def _plain_byte_level(path: Path) -> None:
    """transformers rebuilds a GGUF's gpt2-style BPE vocabulary as a byte-level BPE *with* SentencePiece's byte
    fallback and decoder chain (ByteFallback, Fuse, Replace "▁", ByteLevel). Encoding is the same (every byte has its
    own token, so the fallback never fires), but tools that read tokenizer.json take it for a SentencePiece tokenizer:
    llama.cpp's convert_hf_to_gguf.py wrote a `llama` (SPM) vocabulary that crashed llama-imatrix. Restore the plain
    byte-level form the model's authors ship (no fallback, a ByteLevel decoder)."""
    import json

    if not path.is_file():
        return
    data = json.loads(path.read_text())
    model, pre, dec = data.get("model") or {}, data.get("pre_tokenizer") or {}, data.get("decoder") or {}
    steps = [d.get("type") for d in dec.get("decoders", [])] if dec.get("type") == "Sequence" else []
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or "ByteLevel" not in steps:
        return
    model["byte_fallback"] = False
    data["decoder"] = next(d for d in dec["decoders"] if d.get("type") == "ByteLevel")
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2))
