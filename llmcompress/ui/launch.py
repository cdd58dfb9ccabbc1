"""Start the app: parse the operator's arguments, build the recipes asked for, load the pool, serve.

    python app.py [--runs DIR] [--recipe FILE ...] [--backends hf,vllm,llamacpp] [--port 7860] ...
    llmcompress app [same arguments]

Mistakes in the arguments or recipes print one message naming the fix and exit 2, before any model loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..errors import LLMCompressError
from .config import DEFAULT_RECIPES, RUNS_ENV, AppConfig, Limits, default_model

if TYPE_CHECKING:
    from .pool import ModelPool

REPO = Path(__file__).resolve().parents[2]


def _env_port() -> int:
    """``$GRADIO_SERVER_PORT`` (a Space sets it), else 7860; LLMCompressError when it is not a number."""
    value = os.environ.get("GRADIO_SERVER_PORT") or "7860"
    try:
        return int(value)
    except ValueError:
        raise LLMCompressError(f"app: $GRADIO_SERVER_PORT is {value!r}, not a port number (gradio reads it too). "
                               "Fix: set it to a number (7860), or unset it and pass --port N.") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="Chat with an original model and its compressed variants "
                                "side by side; race their throughput; browse run reports.")
    p.add_argument("--runs", type=Path, default=Path(os.environ.get(RUNS_ENV) or "runs"),
                   help=f"folder of run folders (default: ${RUNS_ENV} or ./runs)")
    p.add_argument("--recipe", type=Path, action="append", default=[],
                   help="a recipe to build into the runs folder on start (resumed when already done; repeatable)")
    p.add_argument("--no-default", action="store_true",
                   help="with no compressed run found, do not build the default recipes: " + ", ".join(DEFAULT_RECIPES))
    p.add_argument("--model", default=None, help="the model the recipes compress (overrides their `model:`)")
    p.add_argument("--original", default=None,
                   help="the original to compare against (default: the one each run names, else smollm2-135m)")
    p.add_argument("--run", action="append", default=[], help="a run folder to load for chat, as a path under "
                   "--runs (`tiny-rtn`, `sweeps/w4/runs/gptq`: the Reports tab's names; repeatable; default: the "
                   "first runs found, up to --max-models)")
    p.add_argument("--max-models", type=int, default=4, help="chat columns, original included (default 4)")
    p.add_argument("--backends", default="auto", help="comma-separated: hf, vllm, llamacpp (hf,vllm,llamacpp); "
                   "auto: hf, plus vllm when `llmcompress setup vllm` has been run (default auto). A GGUF run "
                   "always runs under llamacpp; name llamacpp to run every model there too (a dense one as F16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: each column streams in "
                   "its own thread)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                   help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env_port(),
                   help="port (default: $GRADIO_SERVER_PORT or 7860; 0: any free port)")
    for name, field in Limits.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                       dest=f"limit_{name}", metavar="N", help=f"limit (default {field.default})")
    return p


def parse_args(argv: list[str]) -> AppConfig:
    """The ``AppConfig`` of a command line (LLMCompressError, naming the option, when a value is invalid)."""
    from pydantic import ValidationError

    args = parser().parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    limits = {k[len("limit_"):]: v for k, v in vars(args).items() if k.startswith("limit_")}
    try:
        return AppConfig(
            runs_dir=args.runs, recipes=tuple(args.recipe), build_default=not args.no_default,
            model=args.model, original=args.original, runs=tuple(args.run), max_models=args.max_models,
            backends=backends, device=args.device, dtype=args.dtype, threads=args.threads, host=args.host,
            port=args.port, limits=Limits(**limits),
        )
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if x != "limits"]
        if loc:  # a field (a list's item index after it: `backends.0`): name its option and the value
            raise LLMCompressError(f"app: --{loc[0].replace('_', '-')}: {err['msg']} (got {err.get('input')!r}). "
                                   "Fix: see `app.py --help`.") from None
        # a rule across fields (Limits' model validator): its message names the fields; the input is all of them
        import re

        fields = "|".join(sorted(Limits.model_fields, key=len, reverse=True))
        msg = re.sub(rf"\b({fields})\b", lambda m: "--" + m.group(1).replace("_", "-"),
                     err["msg"].removeprefix("Value error, "))
        raise LLMCompressError(f"app: {msg}. Fix: see `app.py --help`.") from None


def _load_recipes(paths: list[Path], model: str | None) -> list:
    """Validate every recipe before any of them runs (schema, model, extras; never remote code)."""
    from ..pipeline import preflight
    from ..recipe import load_recipe

    recipes = []
    for path in paths:
        if not Path(path).is_file():
            raise LLMCompressError(f"app: --recipe {path}: no such file. Fix: check the path.")
        recipe = load_recipe(path, [f"model={model}"] if model else None)
        if recipe.model.trust_remote_code:
            raise LLMCompressError(f"app: {path}: `trust_remote_code: true` is not allowed in the app (a visitor "
                                   "would run the model's code). Fix: remove it, or build the run yourself first.")
        preflight(recipe)
        recipes.append(recipe)
    return recipes


def build_recipes(config: AppConfig, log: Callable[[str], None] = print) -> None:
    """Run the recipes asked for into the runs folder (finished stages are reused), and the default ones when
    no run holds a compressed model yet."""
    from ..pipeline import run_recipe
    from ..runs import final_model
    from .pool import find_runs

    paths = list(config.recipes)
    def has_model(run: Path) -> bool:
        try:
            return final_model(run) is not None
        except LLMCompressError:  # an unreadable manifest: the pool lists that run as skipped, with the reason
            return False

    if not paths and config.build_default and not any(has_model(r) for r in find_runs(config.runs_dir)):
        paths = [REPO / p for p in DEFAULT_RECIPES]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise LLMCompressError(f"app: no run folder in {config.runs_dir} and the default recipes are missing "
                                   f"({missing[0]}). Fix: pass --runs DIR or --recipe FILE, or --no-default.")
        log(f"no compressed run in {config.runs_dir}: building {', '.join(p.name for p in paths)}")
    model = config.model or (default_model() if not config.recipes else None)
    for recipe in _load_recipes(paths, model):
        run_recipe(recipe, Path(config.runs_dir) / recipe.name, show_progress=False)


def runtime_of(config: AppConfig):
    import torch

    from ..context import Runtime, auto_dtype

    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    dtype = auto_dtype(device) if config.dtype == "auto" else config.dtype
    runtime = Runtime(device=device, threads=config.threads, dtype=dtype, seed=0)
    runtime.apply()
    return runtime


def backends_of(config: AppConfig) -> tuple[str, ...]:
    """The backends to start: ``auto`` adds vllm only when it is set up; an explicit vllm or llamacpp must be.

    A GGUF run gets a llamacpp engine whatever this says (the pool starts one for it: no other backend runs it).
    """
    names = set(config.backends)
    if "auto" in names:
        names.discard("auto")
        names.add("hf")
        try:  # llamacpp is not added here: a GGUF run gets it anyway, and every other model would pay an F16 copy
            _require("vllm", "the app's vllm backend")
            names.add("vllm")
        except LLMCompressError:
            pass
    else:
        for name in sorted(names & {"vllm", "llamacpp"}):
            _require(name, f"app --backends {name}")  # raises with the fix (llmcompress setup vllm / llamacpp)
    names.add("hf")  # always: the pool loads every model in this process too (chat header, tokenizer, limits)
    return tuple(sorted(names))


def _require(name: str, where: str) -> None:
    """Raise LLMCompressError naming ``where`` and the setup command when backend ``name`` is not set up here."""
    from ..backends import BACKENDS

    BACKENDS.get(name).preflight(where)  # the backend is imported only here, when asked for


def llamacpp_slots(config: AppConfig) -> int:
    """Requests each llama-server runs at once: the race's largest batch (timed as one batch, as vLLM runs it)
    and the chat requests that may generate together."""
    return max(config.limits.race_max_batch, config.limits.concurrency)


def prepare(config: AppConfig, log: Callable[[str], None] = print):
    """Build what was asked for and load the pool (the slow part of a start)."""
    from transformers.utils import logging as hf_logging

    from .pool import ModelPool, find_runs, plan

    backends = backends_of(config)
    build_recipes(config, log)
    hf_logging.disable_progress_bar()  # one line per model instead of a bar per weight file (after the runs)
    candidates, skipped = plan(find_runs(config.runs_dir), config.original, config.runs, config.max_models,
                               runs_dir=config.runs_dir)
    return ModelPool.load(candidates, runtime_of(config), backends, skipped=skipped, log=log,
                          slots=llamacpp_slots(config))


class Started(NamedTuple):
    """What a start built: the validated settings and the loaded models (kept across ``gradio app.py`` reloads)."""

    config: AppConfig
    pool: "ModelPool"


def start(argv: list[str] | None = None) -> "Started | int":
    """Parse, build the recipes asked for, load the models (the slow part). An exit code (2: a mistake in the input,
    printed as one message; 130: interrupted) instead when it cannot go on."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    try:
        _env_port()  # gradio itself reads $GRADIO_SERVER_PORT when imported, and fails with a bare ValueError
    except LLMCompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401 - fail early, with the fix, when the extra is missing
    except ImportError:
        print("error: the app needs gradio. Fix: pip install 'llmcompress[app]'", file=sys.stderr)
        return 2
    import signal

    def stop(signum, frame):  # SIGTERM (docker stop, a Space restart) like Ctrl-C: servers are stopped too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        config = parse_args(argv)
        return Started(config, prepare(config, log=lambda m: print(m, file=sys.stderr)))
    except LLMCompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return 130


def demo_of(started: Started):
    """The app's ``gr.Blocks`` for what ``start`` loaded (cheap: ``gradio app.py`` rebuilds it on every reload)."""
    from .app import build_app

    return build_app(started.pool, started.config)


def serve(demo, started: Started) -> int:
    """Serve ``demo`` until Ctrl-C or SIGTERM, then stop the models' servers. Returns the exit code."""
    from .app import launch

    try:
        launch(demo, started.config, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        started.pool.close()
    return 0


def reloading() -> bool:
    """Whether this is ``gradio app.py``'s reload thread re-running the app file (gradio.NO_RELOAD is then false):
    the models stay loaded and the server keeps running; only the Blocks are built again."""
    try:
        import gradio
    except ImportError:
        return False
    return not gradio.NO_RELOAD


def main(argv: list[str] | None = None) -> int:
    """Parse, build, load, serve until Ctrl-C. Returns the exit code (2 for a mistake in the input)."""
    started = start(argv)
    if isinstance(started, int):
        return started
    return serve(demo_of(started), started)
