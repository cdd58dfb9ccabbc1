"""benchmarks/ladder.py: every entry builds a recipe that validates, and an entry that begins with another's stages
starts from that entry's finished stage folders (the 20-minute healing is not paid twice)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def ladder():
    sys.path.insert(0, str(BENCH))
    try:
        import ladder as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_every_entry_is_a_valid_recipe(ladder, tmp_path):
    from llmcompress.recipe import load_recipe

    texts = {"pydoc": tmp_path / "pydoc.txt", "shakespeare": tmp_path / "shakespeare.txt"}
    for name, (spec, chat, _) in ladder.ENTRIES.items():
        recipe = load_recipe(ladder.recipe(name, spec, chat, texts, 2, None))
        assert recipe.stages[-1].type == ("benchmark" if name in ladder.SHRINK else "evaluate"), name


def test_the_budget_entries_change_only_the_distill_budget(ladder):
    first, now = ladder.first_prune_distill(), ladder.compress_stages("recipes/smollm2-prune-distill.yaml")
    for name, base, factor, tokens in (("prune-distill-first-2x", first, 2, 380_928),
                                       ("prune-distill-first-4x", first, 4, 380_928),
                                       ("prune-distill-2x", now, 2, ladder.RECIPE_TOKENS),
                                       ("prune-distill-4x", now, 4, ladder.RECIPE_TOKENS)):
        stages = ladder.compress_stages(ladder.ENTRIES[name][0])
        assert [{**s, "budget": None} for s in stages] == [{**s, "budget": None} for s in base], name
        (distill,) = [s for s in stages if s["type"] == "distill"]
        assert distill["budget"] == {"tokens": factor * tokens}


def test_a_longer_entry_starts_from_the_shared_finished_stages(ladder, tmp_path):
    runs = tmp_path / "runs"
    for entry in ("prune-distill", "prune-distill-first"):
        for i, kind in enumerate(["prune", "prune", "distill"]):
            folder = runs / entry / f"{i + 1:02d}-{kind}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps({"stage": i}))
    assert ladder.reuse_prefix("prune-distill+best", runs) == "prune-distill"
    assert sorted(p.name for p in (runs / "prune-distill+best").iterdir()) == ["01-prune", "02-prune", "03-distill",
                                                                             "manifest.json"]
    assert ladder.reuse_prefix("prune-distill-first-2x", runs) == "prune-distill-first"  # the two prune stages only
    assert sorted(p.name for p in (runs / "prune-distill-first-2x").iterdir()) == ["01-prune", "02-prune",
                                                                                 "manifest.json"]
    assert ladder.reuse_prefix("lowrank-20", runs) is None and not (runs / "lowrank-20").exists()


def test_the_earlier_recipes_are_kept_as_they_were_measured(ladder):
    """The healing entries (first-2x, lr, prose, depth2) were measured from the first recipe, frozen-emb from the
    second: both are written out in the ladder, and the recipe differs from them only in how the prune ranks what it
    cuts and in the frozen embeddings."""
    first, second = ladder.first_prune_distill(), ladder.second_prune_distill()
    now = ladder.compress_stages("recipes/smollm2-prune-distill.yaml")
    assert [s["method"] for s in first[:2]] == [s["method"] for s in now[:2]] == ["depth", "width"]
    assert (first[0]["layers"], first[1]["target"]) == (now[0]["layers"], now[1]["target"])
    assert "importance" not in first[0] and second[0]["importance"] == now[0]["importance"] == "perplexity"
    assert first[1]["calibration"] == ladder.PYSOURCE and second[1]["calibration"] == [ladder.PYSOURCE, ladder.SELFGEN]
    assert now[1]["calibration"] == [{**ladder.PYSOURCE, "samples": 16}, {**ladder.SELFGEN, "samples": 48}]
    assert first[2] == second[2] == {k: v for k, v in now[2].items() if k != "train_embeddings"}
    assert now[2]["train_embeddings"] is False
    assert ladder.compress_stages(ladder.ENTRIES["prune-distill-frozen-emb"][0])[2] == {**second[2],
                                                                                       "train_embeddings": False}
