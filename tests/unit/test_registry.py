from __future__ import annotations

import pytest

from llmcompress.errors import RecipeError
from llmcompress.registry import Registry


def test_register_and_lazy_get():
    reg = Registry("thing")
    reg.register("a")(dict)
    reg.register_lazy("b", "collections:OrderedDict")
    from collections import OrderedDict

    assert reg.get("a") is dict and reg.get("b") is OrderedDict
    assert reg.names() == ["a", "b"] and "b" in reg and "c" not in reg


def test_unknown_name_did_you_mean_and_choices():
    reg = Registry("quantization method")
    for n in ("rtn", "bnb-nf4", "bnb-int8"):
        reg.register_lazy(n, "builtins:int")
    expected = r"unknown quantization method `bnb-nf5`\. Did you mean `bnb-nf4`\? Choices: bnb-int8, bnb-nf4, rtn"
    with pytest.raises(RecipeError, match=expected):
        reg.get("bnb-nf5")


def test_duplicate_and_malformed_entries_rejected():
    reg = Registry("x")
    reg.register_lazy("a", "m:a")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register_lazy("a", "m:b")
    with pytest.raises(ValueError, match="module:attr"):
        reg.register_lazy("b", "no-colon")


def test_builtin_registries_resolve():
    from llmcompress.models import MODELS
    from llmcompress.quant import QUANTIZERS
    from llmcompress.stage import STAGES

    assert {"quantize", "evaluate", "benchmark"} <= set(STAGES.names())
    assert {"rtn", "bnb-nf4", "bnb-fp4", "bnb-int8"} <= set(QUANTIZERS.names())
    assert "smollm2-135m" in MODELS
    for name in QUANTIZERS.names():
        assert QUANTIZERS.get(name).model_fields["method"].default == name  # names written once
