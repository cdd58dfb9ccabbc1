"""Load a GGUF file in a fresh llama.cpp process and compare its logits with a model of this run.

The probe is the reload check of every export (``export.base.reload_check``), with llama.cpp as the consumer: a
new Python process binds llama-cpp-python to the libraries ``setup llamacpp`` built, loads the file from disk,
computes the logits of the probe tokens and hands them back; nothing of this process's state is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from ..utils.proc import die_with_parent
from . import runtime

PROBE_TEXT = "def quantize(model, bits=4):\n    return model  # a short probe text for the reload check"

_CODE = """
import json, sys
import numpy as np
import llama_cpp
args = json.loads(sys.argv[1])
kw = {"lora_path": args["lora"]} if args.get("lora") else {}
llm = llama_cpp.Llama(model_path=args["file"], n_ctx=max(64, len(args["ids"])), logits_all=True,
                      verbose=False, n_threads=args["threads"], n_threads_batch=args["threads"], **kw)
llm.eval(args["ids"])
np.save(args["out"], np.array(llm.scores[: len(args["ids"])], dtype=np.float32))
"""


def fresh_logits(gguf: Path, ids: list[int], threads: int = 1, lora: Path | None = None) -> Any:
    """Logits ``(len(ids), vocab)`` (torch float32) of ``gguf`` (with the GGUF LoRA adapter ``lora``) computed in a
    new process by llama.cpp."""
    import json

    import numpy as np
    import torch

    folder = runtime.require("the GGUF reload check")
    out = Path(gguf).parent / f".{Path(gguf).name}.probe.npy"
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(runtime.bin_dir(folder))}
    args = json.dumps({"file": str(gguf), "ids": list(map(int, ids)), "threads": threads, "out": str(out),
                       "lora": str(lora) if lora else None})
    try:
        run = subprocess.run([sys.executable, "-c", _CODE, args], capture_output=True, text=True, env=env,
                             timeout=900, preexec_fn=die_with_parent())
        if run.returncode != 0 or not out.is_file():
            raise LLMCompressError(f"`{gguf}` did not load in a fresh llama.cpp process (exit {run.returncode}):\n"
                                   f"{run.stderr[-2000:]}\nFix: re-run the stage that wrote it.")
        return torch.from_numpy(np.load(out))
    finally:
        out.unlink(missing_ok=True)


def compare(theirs: Any, ours: Any) -> dict[str, Any]:
    """Figures of the reload check (same keys as ``export.base.reload_check``)."""
    import torch

    ok = bool(torch.isfinite(theirs).all())
    if not ok:
        raise LLMCompressError("the GGUF computed non-finite logits in llama.cpp. Fix: re-run the stage that wrote "
                               "it; if it persists, try another gguf_type.")
    diff = (theirs - ours).abs()
    return {"tokens": int(theirs.shape[0]), "engine": f"llama.cpp {runtime.LLAMA_CPP_COMMIT} (fresh process)",
            "max_abs_logit_diff": round(float(diff.max()), 6), "max_abs_logit": round(float(ours.abs().max()), 4),
            "top1_agreement": round(float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()), 4)}


def probe_ids(tokenizer: Any) -> list[int]:
    return tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:32]


def logits_of(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().cpu()


def check_file(gguf: Path, reference: Any, tokenizer: Any, threads: int = 1) -> dict[str, Any]:
    """Load ``gguf`` in a fresh llama.cpp process; compare its logits on the probe text with ``reference``'s (a
    model of this run: the one the file was made from, or the evaluated one)."""
    ids = probe_ids(tokenizer)
    return compare(fresh_logits(gguf, ids, threads), logits_of(reference, ids))


def check_lora(gguf: Path, adapter: Path, with_adapter: Any, base: Any, tokenizer: Any,
               threads: int = 1) -> dict[str, Any]:
    """Base GGUF + GGUF LoRA adapter in a fresh llama.cpp process against the transformers model with the adapter,
    plus whether the adapter moves llama.cpp's logits the way it moves transformers' (cosine of the two changes)."""
    import torch

    ids = probe_ids(tokenizer)
    theirs, theirs_base = fresh_logits(gguf, ids, threads, lora=adapter), fresh_logits(gguf, ids, threads)
    ours, ours_base = logits_of(with_adapter, ids), logits_of(base, ids)
    out = compare(theirs, ours)
    d_theirs, d_ours = (theirs - theirs_base).flatten(), (ours - ours_base).flatten()
    out["adapter_effect"] = {
        "cosine": round(float(torch.nn.functional.cosine_similarity(d_theirs, d_ours, dim=0)), 4),
        "llamacpp_mean_abs_change": round(float(d_theirs.abs().mean()), 5),
        "transformers_mean_abs_change": round(float(d_ours.abs().mean()), 5)}
    return out
