"""The vision recipes on the builtin digits ConvNeXt (trained here on first use, then cached), end to end, through
the command line. Marked slow; CI runs them. No hub, no skip: scripts/test.sh installs the `vision` extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(name: str, out: Path, *overrides: str) -> dict:
    from tests.unit.test_cli import cli

    args = [a for o in overrides for a in ("--set", o)]
    r = cli("run", ROOT / "recipes" / f"{name}.yaml", "--output", out, "--quiet", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_default_model_learned_the_digits():
    from llmcompress.models import MODELS
    from llmcompress.utils.io import read_json

    folder = MODELS.get("digits-convnext")()
    training = read_json(folder / "llmcompress.json")["training"]
    assert training["test_images"] == 360 and training["train_images"] == 1437
    assert training["test_top1"] > 0.95  # measured 0.972 (seed 0, 10 epochs, 1 thread)


def test_vision_quickstart_reports_accuracy_size_and_speed(tmp_path):
    report = _run("vision-quickstart", tmp_path / "q", "stages.2.repeats=3")
    orig, comp = report["models"]["original"], report["models"]["compressed"]
    assert orig["eval"]["digits"]["acc"] > 0.95 and orig["eval"]["digits"]["samples"] == 360
    assert abs(comp["eval"]["digits"]["acc"] - orig["eval"]["digits"]["acc"]) <= 0.02  # int8 keeps the accuracy
    assert comp["kl"]["top1_agreement"] > 0.97 and comp["kl"]["kl_mean"] < 0.01
    assert report["comparison"]["size"]["shrink"] > 2.4  # the MLPs (86% of the weights) go to int8
    for model in (orig, comp):
        for bs in (1, 32):
            assert model["bench"][f"images_per_s_bs{bs}"] > 1 and model["bench"][f"latency_ms_bs{bs}"] > 0
        assert model["bench"]["peak_rss_bytes"] > 0
    head = report["comparison"]["headline"]
    assert head["quality"]["metric"] == "acc" and head["speed"]["figure"] == "images_per_s_bs1"
    q = report["stages"][0]["data"]
    assert q["layers"]["quantized"] == {"DynamicQuantizedLinear": 8} and q["layers"]["dense"] == {"Conv2d": 7,
                                                                                                 "Linear": 1}
    md = (tmp_path / "q" / "report.md").read_text()
    assert "dynamic-int8" in md and "images/s (batch 32)" in md


def test_vision_prune_lora_recovers_accuracy(tmp_path):
    report = _run("vision-prune-lora", tmp_path / "p", "stages.4.repeats=3")
    before = report["stages"][1]["data"]["compressed"]["digits"]
    after = report["stages"][3]["data"]["compressed"]["digits"]
    original = report["models"]["original"]["eval"]["digits"]["acc"]
    assert after["acc"] >= before["acc"] and after["acc"] >= original - 0.02
    rec = report["comparison"]["recovery"]
    assert rec["figures"]["kl_mean"]["gap_closed"] > 0.5  # measured 91%
    prune = report["stages"][0]["data"]
    assert prune["removed_share"] == pytest.approx(0.5) and report["comparison"]["size"]["shrink"] > 1.5
    bench = report["models"]
    assert bench["compressed"]["bench"]["param_bytes"] < 0.65 * bench["original"]["bench"]["param_bytes"]
    merges = report["stages"][2]["data"]["merges"]
    assert set(merges) == {"dequantized", "keep"} and all(m["acc"] > 0.9 for m in merges.values())
