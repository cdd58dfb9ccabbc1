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
