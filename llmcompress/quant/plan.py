"""Which linear layers a method quantizes, decided from the model's config alone (an empty meta-device model), with
the group size and calibration length checked before any weights load. Shared by the calibrated methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import RecipeError


def meta_model(path: Path) -> tuple[Any, Any]:
    """``(config, model)`` of a model folder, the model on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


def plan_layers(
    skips: Callable[[str], bool], config: Any, model: Any, group_size: int | None, seq_len: int | None,
    exclude: tuple[str, ...] = (),
) -> dict[str, list[str]]:
    """``{"quantized": [...], "skipped": [...]}`` linear layer names (``exclude``: left out of both).

    Raises RecipeError (with the fix) when ``skip`` leaves nothing, ``group_size`` does not divide a quantized layer's
    input width (``None`` or -1: no groups), or ``seq_len`` exceeds the model's context.
    """
    import torch

    linears = {n: m.in_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n not in exclude}
    skipped = [n for n in linears if skips(n)]
    quantized = [n for n in linears if n not in skipped]
    if not quantized:
        raise RecipeError(
            f"`skip` leaves no linear layer to quantize ({len(skipped)} skipped). Fix: skip fewer layers."
        )
    if group_size not in (None, -1):
        bad = {n: linears[n] for n in quantized if linears[n] % group_size}
        if bad:
            name, width = next(iter(bad.items()))
            widths = sorted({linears[n] for n in quantized})
            fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
            raise RecipeError(
                f"group_size {group_size} does not divide the input width {width} of `{name}` "
                f"({len(bad)} layers affected). Fix: use a divisor of {', '.join(map(str, widths))}"
                f"{' such as ' + ' or '.join(map(str, fits)) if fits else ''}, or -1."
            )
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        raise RecipeError(
            f"calibration.seq_len {seq_len} exceeds the model's max_position_embeddings ({limit}). "
            f"Fix: set `seq_len` <= {limit}."
        )
    return {"quantized": quantized, "skipped": skipped}
