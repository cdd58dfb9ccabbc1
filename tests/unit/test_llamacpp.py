"""The llama.cpp plug-in without llama.cpp: GGUF method validation, setup checks, log parsing, architecture checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmcompress.quant  # noqa: F401 - the registry first (as a recipe load does)
from llmcompress.errors import LLMCompressError, RecipeError
from llmcompress.llamacpp import runtime
from llmcompress.llamacpp.quant import GGUFConfig, _type_counts


def gguf(**kw) -> GGUFConfig:
    return GGUFConfig(type="quantize", method="gguf", **kw)


def test_gguf_types_are_checked_with_did_you_mean():
    assert gguf(gguf_type="q4_k_m").gguf_type == "Q4_K_M"
    with pytest.raises(ValueError, match=r"unknown GGUF type `Q4_KM`\. Did you mean `Q4_K_M`\?"):
        gguf(gguf_type="Q4_KM")
    with pytest.raises(ValueError, match="unknown ggml type `q9_0`"):
        gguf(tensor_types={"attn_v": "q9_0"})
    with pytest.raises(ValueError, match="not a regular expression"):
        gguf(tensor_types={"(": "q8_0"})
    with pytest.raises(ValueError, match="needs an importance matrix"):
        gguf(gguf_type="IQ2_XS", imatrix=False)
    with pytest.raises(ValueError, match="tensor_types"):
        gguf(skip=["lm_head"])
    assert gguf(tensor_types={"attn_v": "Q8_0"}).tensor_types == {"attn_v": "q8_0"}
    assert gguf(gguf_type="Q4_0").bits_per_weight() == pytest.approx(4.34)


def test_not_set_up_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_LLAMACPP_DIR", str(tmp_path / "none"))
    with pytest.raises(LLMCompressError, match="llmcompress setup llamacpp"):
        runtime.require("method gguf")
    with pytest.raises(LLMCompressError, match="llmcompress setup llamacpp"):
        gguf().preflight(tmp_path)


def fake_build(folder: Path, flags: list[str], arch_names=("LlamaForCausalLM",)) -> None:
    (folder / "build" / "bin").mkdir(parents=True)
    for t in runtime.TOOLS:
        (folder / "build" / "bin" / t).write_text("")
    src = runtime.source_dir(folder)
    (src / "conversion").mkdir(parents=True)
    regs = "\n".join(f'@ModelBase.register("{a}", "Other{a}")\nclass X: pass' for a in arch_names)
    (src / "convert_hf_to_gguf.py").write_text("")
    (src / "conversion" / "llama.py").write_text(regs)
    (folder / runtime.STAMP).write_text(json.dumps({"pin": runtime.PIN, "cmake": list(runtime.cmake_flags()),
                                                    "cpu_flags": flags}))


def test_a_build_for_another_cpu_is_refused_with_the_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_LLAMACPP_DIR", str(tmp_path))
    fake_build(tmp_path, ["avx2", "avx512_vnni"])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(LLMCompressError, match=r"avx512_vnni.*setup llamacpp --force"):
        runtime.require("the llamacpp backend")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512_vnni", "avx512f"})
    assert runtime.require("x") == tmp_path


def test_a_build_with_other_cmake_options_is_rebuilt(tmp_path, monkeypatch):
    """A build from before AMX was compiled out (its AMX weight layout segfaulted on AMX Xeons) is not used."""
    monkeypatch.setenv("LLMCOMPRESS_LLAMACPP_DIR", str(tmp_path))
    fake_build(tmp_path, ["avx2"])
    stamp = json.loads((tmp_path / runtime.STAMP).read_text())
    (tmp_path / runtime.STAMP).write_text(json.dumps({**stamp, "cmake": list(runtime.CMAKE_FLAGS)}))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.raises(LLMCompressError, match="incomplete or another version.*llmcompress setup llamacpp"):
        runtime.require("method gguf")


def test_amx_is_compiled_out_on_x86_only(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert runtime.cmake_flags()[-2:] == (f"-DCMAKE_C_FLAGS={runtime.NO_AMX}", f"-DCMAKE_CXX_FLAGS={runtime.NO_AMX}")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert runtime.cmake_flags() == runtime.CMAKE_FLAGS


def test_reports_name_amx_but_the_build_stamp_does_not(monkeypatch):
    """Benchmarks write the CPU's AMX flags beside their figures; the build, compiled without AMX, never asks for it."""
    amx = {"amx_tile", "amx_int8", "amx_bf16"}
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "sse4_2", *amx})
    assert runtime.isa_flags() == ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512f"]
    assert not amx & set(runtime._BUILD_FLAGS) and set(runtime._BUILD_FLAGS) == set(runtime._ISA_FLAGS) - amx


def test_unsupported_architecture_is_refused_before_weights_load(tmp_path, monkeypatch):
    from llmcompress.llamacpp.convert import check_convertible

    monkeypatch.setenv("LLMCOMPRESS_LLAMACPP_DIR", str(tmp_path / "lc"))
    fake_build(tmp_path / "lc", sorted(runtime.cpu_flags() & set(runtime._BUILD_FLAGS)))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(RecipeError, match=r"does not support the architecture \['FooForCausalLM'\]"):
        check_convertible(model, "method gguf")
    (model / "config.json").write_text(json.dumps({"architectures": ["OtherLlamaForCausalLM"]}))
    check_convertible(model, "method gguf")  # every name of a register() call counts


def test_setup_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "thesis.tex").write_text("keep me")
    with pytest.raises(LLMCompressError, match="holds files `setup` did not write"):
        runtime.setup(folder=tmp_path, log=lambda m: None)
    assert (tmp_path / "thesis.tex").read_text() == "keep me"


QUANTIZE_LOG = """\
[   1/ 272]                   output_norm.weight - [   576,      1,      1,      1], type =    f32, size =    0.002 MiB
[   2/ 272]                    token_embd.weight - [   576,  49152,      1,      1], type =    f16,
====== llama_model_quantize_impl: did not find weights for token_embd.weight
converting to q8_0 .. load_imatrix: imatrix dataset='calibration.txt'
size =    54.00 MiB ->    28.69 MiB
[   3/ 272] blk.0.attn_k.weight - [   576,    192,      1,      1], type =    f16, converting to q5_0 .. size = 0.2
[   4/ 272] blk.0.ffn_down.weight - [  1536,    576,      1,      1], type =    f16, converting to q6_K .. size = 1
"""


def test_tensor_types_are_read_from_llama_quantize_log():
    assert _type_counts(QUANTIZE_LOG) == {"f32": 1, "q8_0": 1, "q5_0": 1, "q6_K": 1}


def test_gguf_transformers_tokenizer_is_written_as_plain_byte_level(tmp_path):
    from llmcompress.models.gguf import _plain_byte_level

    tok = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": {"type": "ByteLevel"},
           "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                                       {"type": "ByteLevel", "add_prefix_space": True}]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    _plain_byte_level(tmp_path / "tokenizer.json")
    out = json.loads((tmp_path / "tokenizer.json").read_text())
    assert out["model"]["byte_fallback"] is False
    assert out["decoder"] == {"type": "ByteLevel", "add_prefix_space": True}
