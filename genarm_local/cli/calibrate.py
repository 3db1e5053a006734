"""`genarm-local calibrate`: measure how far an ARM moves its base (mean per-token KL against α) and store the α
that spends the KL budget in the ARM's GGUF, where an ARM given without a weight finds it.

    genarm-local calibrate ARM.gguf [--base BASE.gguf] [--prompts FILE] [--budget KL]

The flags are generated from CalibrationConfig (genarm_local/evaluation/calibration.py); the measuring is
evaluation.calibration.calibrate, the writing convert.write_calibration (atomic: the file is rewritten whole or
not at all).
"""

from __future__ import annotations

import argparse
import sys

from ..evaluation.calibration import CalibrationConfig
from .flags import add_config_arguments, config_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CalibrationConfig)


def main(args: argparse.Namespace) -> None:
    from ..convert import write_calibration
    from ..evaluation.calibration import calibrate, curve_lines
    from .flags import note

    config = CalibrationConfig(**config_options(CalibrationConfig, args))
    calibration = calibrate(config, progress=note if sys.stderr.isatty() else None)
    print("\n".join(curve_lines(calibration)))
    if config.write:
        from ..core.config import resolve_arm_path

        path = write_calibration(resolve_arm_path(config.arm), calibration)
        print(f"wrote the calibration into {path}")
