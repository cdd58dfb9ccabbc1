"""Text the original model writes for calibration (``builtin:mixed``), sampled in fixed batches and cached on disk.

Item ``i`` of a domain is prompt ``prompts[i % len(prompts)]``; items are generated in fixed batches of
``Sampling.batch_size`` (batch ``k`` holds items ``k*B .. k*B+B-1``, left-padded, seeded from ``(seed, domain, k)``),
so a batch's text does not depend on how many batches a request needs: a request for more text reuses every cached
batch and generates only the rest. Batches are cached under ``<cache>/calibration/<domain>-<key>/``, where the key
holds the model's fingerprint, the seed, the prompts, the chat template, the sampling settings and the torch /
transformers versions: a second run with the same model and settings generates nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LLMCompressError
from ..utils.cache import cache_dir
from ..utils.io import atomic_write_json, file_lock, read_json, stable_hash

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How the original model writes one domain's text (part of the cache key)."""

    temperature: float
    top_p: float
    max_new_tokens: int  # per item; a batch runs until its longest item ends or reaches this
    batch_size: int = 8  # items per generate() call; fixed, so cached batches stay valid for any request size


class Writer:
    """The original model that writes the text: a ``ModelHandle`` (``ctx.original``: loaded at the first batch that
    is not cached, and released when the ``with`` block ends unless it was loaded already) or a loaded transformers
    model. ``with Writer(model) as writer: writer.model()``."""

    def __init__(self, model: Any):
        if not (hasattr(model, "fingerprint") and hasattr(model, "load")) and not hasattr(model, "generate"):
            raise LLMCompressError(
                f"calibration: `model` must be the run's ModelHandle (`ctx.original`) or a loaded transformers "
                f"model, got {type(model).__name__}. Fix: pass one of those."
            )
        self.source = model
        self._model: Any = None
        self._release = False
        self._fingerprint: str | None = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._release:
            self.source.release()
        self._model, self._release = None, False

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            has = hasattr(self.source, "fingerprint")
            self._fingerprint = self.source.fingerprint() if has else weights_hash(self.source)
        return self._fingerprint

    def model(self) -> Any:
        """The loaded model (loaded now if needed)."""
        if self._model is None:
            if hasattr(self.source, "load"):
                self._release = getattr(self.source, "_loaded", None) is None
                self._model, _ = self.source.load()
            else:
                self._model = self.source
        return self._model


def weights_hash(model: Any) -> str:
    """sha256 over a loaded model's tensor names, dtypes, shapes and bytes (~0.3 s for 135M parameters)."""
    import torch

    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def generated_texts(
    writer: Writer, tokenizer: Any, domain: str, prompts: list[str], sampling: Sampling, seed: int,
    enough: Callable[[list[str]], bool], key_parts: dict[str, Any],
) -> list[str]:
    """Outputs of items 0, 1, 2, ... (one per prompt, cycling through ``prompts``), whole batches at a time, until
    ``enough(outputs so far)``. ``prompts`` are the model's inputs as text (chat turns already rendered)."""
    key = stable_hash({"model": writer.fingerprint(), "domain": domain, "seed": seed, "sampling": asdict(sampling),
                       "prompts": stable_hash(prompts, 64), **key_parts, **_library_versions()})
    folder = cache_dir("calibration", f"{domain}-{key}")
    folder.mkdir(parents=True, exist_ok=True)
    outputs: list[str] = []
    made, seconds = 0, 0.0
    # Locked: sweep workers on one machine wait for the first to write a batch instead of each writing it.
    with file_lock(folder / ".lock"):
        for k in range(_max_batches(sampling)):
            if enough(outputs):
                break
            path = folder / f"batch-{k:05d}.json"
            batch = _read_batch(path)
            if batch is None:
                B = sampling.batch_size
                inputs = [prompts[i % len(prompts)] for i in range(k * B, (k + 1) * B)]
                model = writer.model()
                t0 = time.perf_counter()
                batch = generate(model, tokenizer, inputs, sampling, batch_seed(seed, domain, k))
                seconds += time.perf_counter() - t0
                made += 1
                atomic_write_json(path, {"inputs": inputs, "texts": batch,
                                         "seconds": round(time.perf_counter() - t0, 3)})
            outputs += batch
        else:
            raise LLMCompressError(f"calibration: {domain} text still too short after {_max_batches(sampling)} "
                                   f"batches of generation. Fix: lower `samples` or `seq_len`.")
    if made:
        log.info("calibration %s: generated %d batch(es) of %d in %.1f s (cached in %s)", domain, made,
                 sampling.batch_size, seconds, folder)
    return outputs


def _max_batches(sampling: Sampling) -> int:
    return 100_000 // sampling.batch_size  # a bound on a loop that always progresses (every item adds text)


def _read_batch(path: "Path") -> list[str] | None:
    if not path.is_file():
        return None
    try:
        texts = read_json(path)["texts"]
    except (ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # a torn or foreign file: generate it again
        return None
    return texts if isinstance(texts, list) and all(isinstance(t, str) for t in texts) else None


def batch_seed(seed: int, domain: str, k: int) -> int:
    return int(stable_hash([seed, domain, k]), 16) % 2**31


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def generate(model: Any, tokenizer: Any, inputs: list[str], sampling: Sampling, seed: int) -> list[str]:
    """One batched, seeded ``generate`` call: ``inputs`` left-padded; returns each continuation decoded (special
    tokens dropped). The global RNGs are left as they were."""
    import torch
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in inputs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, W), left-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    config = GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        max_new_tokens=sampling.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
    )
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]
