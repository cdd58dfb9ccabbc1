import logging
import warnings

from llmcompress.utils.liblogs import libraries_log_to


def test_library_chatter_goes_to_the_run_log_not_the_console(tmp_path, capfd):
    import torch  # noqa: F401
    from transformers.utils import logging as hf_logging

    log = tmp_path / "logs" / "libraries.log"
    before = logging.getLogger("transformers").handlers[:]
    with libraries_log_to(log):
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        logging.getLogger("torch.utils._pytree").warning("Enum subclass is now natively supported")
        hf_logging.get_logger("transformers.modeling_utils").warning("loss_type=None was set in the config")
        warnings.warn("`device` is deprecated", FutureWarning, stacklevel=1)
        assert not hf_logging.is_progress_bar_enabled()
    out, err = capfd.readouterr()
    text = log.read_text()
    for line in ("_C_mxfp8.so", "natively supported", "loss_type=None", "`device` is deprecated"):
        assert line in text and line not in err + out
    # everything is put back afterwards
    assert logging.getLogger("transformers").handlers == before and hf_logging.is_progress_bar_enabled()
    logging.getLogger("torchao").warning("after the run")
    assert "after the run" not in log.read_text()


def test_other_libraries_tqdm_bars_stay_off_the_console(tmp_path, capfd):
    from tqdm.auto import tqdm

    with libraries_log_to(tmp_path / "libraries.log"):
        for _ in tqdm(range(3), desc="Decompressing model"):  # as compressed-tensors draws it
            pass
    assert "Decompressing model" not in capfd.readouterr().err
    for _ in tqdm(range(3), desc="after the run"):  # put back afterwards
        pass
    assert "after the run" in capfd.readouterr().err


def _run(tmp_path, *options):
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: lv\nmodel: tiny-random-llama\nthreads: 1\n"
                      "stages:\n  - {type: quantize, method: rtn, bits: 4, group_size: 32}\n")
    run = tmp_path / ("run" + "".join(options).replace("-", "_"))
    proc = subprocess.run([sys.executable, "-m", "llmcompress.cli", *options, "run", str(recipe), "-o", str(run),
                           "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr, (run / "logs" / "libraries.log").read_text()


def test_log_level_and_verbose_as_a_cli_user_sets_them(tmp_path):
    err, kept = _run(tmp_path)  # default: warnings and up, kept in the run folder, not printed
    assert " INFO " not in err + kept
    err, kept = _run(tmp_path, "--log-level", "info")  # kept, not printed
    assert "INFO transformers.modeling_utils: loading weights file" in kept and " INFO " not in err
    err, kept = _run(tmp_path, "--verbose")  # printed too, at info
    assert "INFO transformers.modeling_utils: loading weights file" in kept
    assert "INFO transformers.modeling_utils: loading weights file" in err
    assert " DEBUG " not in kept


def test_cli_log_levels_are_the_library_ones():
    import typing

    from llmcompress.cli import LogLevel
    from llmcompress.utils.liblogs import LEVELS

    assert typing.get_args(LogLevel) == LEVELS


def test_an_unknown_level_in_the_environment_falls_back_to_warning(monkeypatch):
    from llmcompress.utils.liblogs import log_level

    monkeypatch.setenv("LLMCOMPRESS_LOG_LEVEL", "chatty")
    assert log_level() == logging.WARNING
    monkeypatch.setenv("LLMCOMPRESS_LOG_LEVEL", "DEBUG")
    assert log_level() == logging.DEBUG
