"""Evaluation texts the benchmarks share: held-out Python docs and a second domain, as files of a fixed token count.

(Named so as not to shadow a package: a script in benchmarks/ puts this folder first on sys.path; gguf-py is `gguf`.)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def eval_texts(folder: Path, tokens: int) -> dict[str, Path]:
    """The evaluation texts as files: the first ``tokens`` tokens of Python's docs, and tinyshakespeare's."""
    from transformers import AutoTokenizer

    from llmcompress.data.corpora import builtin_text
    from llmcompress.models.builtin import smollm2_135m

    tok = AutoTokenizer.from_pretrained(str(smollm2_135m()))
    out = {}
    for name, text in (("pydoc", builtin_text("builtin:pydoc")),
                       ("shakespeare", SHAKESPEARE.read_text() if SHAKESPEARE.is_file() else None)):
        if text is None:
            continue
        ids = tok(text[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
        path = folder / f"eval-{name}.txt"
        path.write_text(tok.decode(ids))
        out[name] = path
    return out
