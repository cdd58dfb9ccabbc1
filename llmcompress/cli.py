"""Command line: ``llmcompress run | validate | ls``. Thin: it parses arguments and prints; the library does the work.

User mistakes (LLMCompressError) print one clear message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import LLMCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LLMs with recipes and prove what it cost and what it bought.")
err = Console(stderr=True)
out = Console()

SET_HELP = "Override a recipe value: --set stages.0.bits=4 (repeatable; values are YAML)."


def _fail(e: LLMCompressError) -> None:
    err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<recipe name>)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Discard finished stages in the run folder and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a recipe: every stage, then report.json, report.md and plots in the run folder."""
    from .pipeline import run_recipe

    try:
        run_recipe(recipe, output, overrides=set_, fresh=fresh, console=err, show_progress=not quiet)
    except LLMCompressError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished stages are kept; run the same command again to resume.")
        raise typer.Exit(130) from None


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a recipe (schema, model reference, installed extras) without loading any weights."""
    from rich.table import Table

    from .pipeline import preflight
    from .recipe import load_recipe

    try:
        r = load_recipe(recipe, set_)
        preflight(r)
    except LLMCompressError as e:
        _fail(e)
    table = Table(title=f"{recipe}: valid — {r.name} on {r.model.source} ({r.dtype})")
    table.add_column("#")
    table.add_column("stage")
    table.add_column("settings")
    for i, s in enumerate(r.stages):
        settings = s.model_dump(exclude={"type", "method", "name"}, exclude_defaults=True)
        table.add_row(str(i), s.kind, ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)")
    out.print(table)


@app.command("ls")
def ls() -> None:
    """List what the registries know: builtin models, stage types, quantization methods, local eval tasks."""
    from rich.table import Table

    from .models import MODELS
    from .quant import QUANTIZERS
    from .stage import STAGES

    table = Table(title="llmcompress")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("what")
    for name in MODELS.names():
        table.add_row("model", name, _first_line(MODELS.get(name).__doc__))
    for name in STAGES.names():
        table.add_row("stage", name, _first_line(_stage_doc(name)))
    for name in QUANTIZERS.names():
        table.add_row("quantize method", name, _first_line(QUANTIZERS.get(name).__doc__))
    from .prune import PRUNERS

    for name in PRUNERS.names():
        table.add_row("prune method", name, _first_line(PRUNERS.get(name).__doc__))
    for name in _local_tasks():
        table.add_row("eval task", name, "local lm-eval task in evals/ (offline)")
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for f in sorted(recipes.glob("*.yaml")):
        table.add_row("recipe", str(f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f), "")
    out.print(table)


def _stage_doc(name: str) -> str | None:
    from .stage import STAGES

    if name == "quantize":
        return "Quantize the model with one of the methods below."
    if name == "prune":
        return "Prune the model (dense zeros) with one of the methods below."
    return STAGES.get(name).__doc__


def _local_tasks() -> list[str]:
    try:
        from .eval.tasks import local_task_names
    except ImportError:
        return []
    return local_task_names()


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def main() -> None:
    try:
        app()
    except LLMCompressError as e:  # raised outside a command (should not happen, but never show a traceback)
        err.print(f"[bold red]error:[/bold red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
