"""Data that compression methods read: calibration text for methods that look at activations (GPTQ, AWQ, Wanda, ...)."""

from .calibration import CalibrationConfig, check_calibration, load_calibration, read_calibration_texts, to_records

__all__ = ["CalibrationConfig", "check_calibration", "load_calibration", "read_calibration_texts", "to_records"]
