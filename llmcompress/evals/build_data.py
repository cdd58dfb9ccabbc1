"""Build the local evaluation data in ``llmcompress/evals/data/`` from Python's own reference text
(``pydoc_data.topics``).

Deterministic for a given Python version (fixed seed; the topics text ships with Python and is PSF licensed).
Run ``python llmcompress/evals/build_data.py`` and commit the files it writes; ``MANIFEST.json`` records how they were
made.

- ``pydoc_ppl.jsonl``: ``{"topic", "text"}`` passages of 700-1,200 characters (~200 tokens), for rolling perplexity;
  short, so that lm-eval's batches stay small on CPU.
- ``pydoc_cloze.jsonl``: ``{"topic", "context", "choices", "label"}``: which of 4 sentences truly follows the context?
  The 3 distractors are sentences of similar length from other topics. ``pydoc_cloze_shots.jsonl``: a few more items
  of the same kind, used only as few-shot examples.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

SEED = 1234
PPL_DOCS = 150          # passages in pydoc_ppl (the stage's `limit` takes the first N)
PPL_CHARS = (700, 1200)  # passages end at the first paragraph boundary past 700 characters; longer ones are dropped
CLOZE_ITEMS = 250       # items in pydoc_cloze (test split)
CLOZE_SHOTS = 16        # separate items for few-shot examples (train split), never scored
CONTEXT_SENTENCES = 3   # at most this many sentences before the target
TARGET_CHARS = (30, 200)
MIN_CONTEXT_CHARS = 60

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Mr|Dr|No)\.$")


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as t

    return dict(sorted(t.items()))


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, with their line breaks kept."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_prose(par: str) -> bool:
    """Running English text: no indented code/grammar lines, no heading underlines, no tables."""
    lines = par.splitlines()
    if any(line[:1].isspace() for line in lines):
        return False
    if any(re.fullmatch(r"[*=\-+|]{3,}.*", line) for line in lines):
        return False
    if re.match(r"(?:[*\-•]|\d+\.|\(\d+\))\s", par):
        return False  # a list item: its "sentences" are fragments
    return "::=" not in par and ">>>" not in par


def sentences(par: str) -> list[str]:
    """Split a prose paragraph into sentences (joining its lines); abbreviations such as "e.g." do not split."""
    flat = " ".join(line.strip() for line in par.splitlines())
    out: list[str] = []
    for piece in _SENTENCE_END.split(flat):
        if out and _ABBREV.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return [s.strip() for s in out if s.strip()]


def ppl_docs(tops: dict[str, str], rng: random.Random) -> list[dict]:
    """Passages of whole paragraphs (code included: it is part of the real text), PPL_CHARS long."""
    lo, hi = PPL_CHARS
    docs = []
    for name, text in tops.items():
        chunk: list[str] = []
        for par in paragraphs(text):
            chunk.append(par)
            size = sum(len(c) + 2 for c in chunk) - 2
            if size >= lo:
                if size <= hi:
                    docs.append({"topic": name, "text": "\n\n".join(chunk)})
                chunk = []
    rng.shuffle(docs)
    return docs[:PPL_DOCS]


def cloze_items(tops: dict[str, str], rng: random.Random) -> list[dict]:
    """One candidate item per prose paragraph with >= 2 sentences; then a seeded sample of CLOZE_ITEMS."""
    lo, hi = TARGET_CHARS
    pool: list[tuple[str, str]] = []        # (topic, sentence) usable as a distractor
    candidates: list[tuple[str, list[str], str]] = []
    for name, text in tops.items():
        for par in filter(is_prose, paragraphs(text)):
            sents = sentences(par)
            ok = [i for i, s in enumerate(sents) if lo <= len(s) <= hi and s.endswith(".")]
            pool += [(name, sents[i]) for i in ok]
            targets = [i for i in ok if len(" ".join(sents[max(0, i - CONTEXT_SENTENCES): i])) >= MIN_CONTEXT_CHARS]
            if targets:
                i = rng.choice(targets)
                context = sents[max(0, i - CONTEXT_SENTENCES): i]
                candidates.append((name, context, sents[i]))
    rng.shuffle(candidates)
    items = []
    for name, context, target in candidates:
        similar = [s for t, s in pool if t != name and 0.67 <= len(s) / len(target) <= 1.5 and s != target]
        if len(similar) < 3:
            continue
        choices = rng.sample(similar, 3) + [target]
        rng.shuffle(choices)
        items.append({"topic": name, "context": " ".join(context), "choices": choices, "label": choices.index(target)})
        if len(items) == CLOZE_ITEMS + CLOZE_SHOTS:
            break
    return items


def write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def main(out: Path = Path(__file__).resolve().parent / "data") -> None:
    out.mkdir(parents=True, exist_ok=True)
    tops = topics()
    ppl = ppl_docs(tops, random.Random(SEED))
    cloze = cloze_items(tops, random.Random(SEED + 1))
    cloze, shots = cloze[:CLOZE_ITEMS], cloze[CLOZE_ITEMS:]
    files = {"pydoc_ppl.jsonl": ppl, "pydoc_cloze.jsonl": cloze, "pydoc_cloze_shots.jsonl": shots}
    manifest = {
        "source": "pydoc_data.topics (Python's reference documentation; PSF license)",
        "python": sys.version.split()[0],
        "seed": SEED,
        "files": {name: {"rows": len(rows), "sha256": write_jsonl(out / name, rows)} for name, rows in files.items()},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
