"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""


class LLMCompressError(Exception):
    """Base class: a mistake in the input or the environment, with a message that names the place and the fix."""


class RecipeError(LLMCompressError):
    """The recipe (or an override) is wrong: unknown key, bad value, missing file, impossible combination."""


class RunCrashed(LLMCompressError):
    """A run crashed (a training subprocess died: out of memory, an NCCL failure), not bad input: the message says
    where its log is. Sweeps retry it like any other crash; the CLI prints it without a traceback."""


class MissingExtraError(LLMCompressError):
    """An optional dependency is not installed; the message names the `pip install` that fixes it."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the `{package}` package, which is not installed. "
            f"Fix: pip install -c constraints.txt 'llmcompress[{extra}]'"
        )
        self.package, self.extra = package, extra


def require(package: str, extra: str, what: str) -> None:
    """Raise MissingExtraError unless `package` is importable (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise MissingExtraError(package, extra, what)
