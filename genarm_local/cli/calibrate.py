"""`genarm-local calibrate`: sample the base and the ARM-guided model at a grid of weights α, judge each α's text
against the base's (distinct-2, rep-4, degenerate rate; the KL to the base beside them), and store the largest α
whose text stays as fluent as the base's in the ARM's GGUF, where an ARM given without a weight finds it; then show
a few of the prompts continued by the base and by the guided model at that α (evaluation/showcase.py).

    genarm-local calibrate ARM.gguf [--base BASE.gguf] [--prompts FILE] [--alphas A ...] [--show N]

The flags are generated from CalibrationConfig (genarm_local/evaluation/calibration.py); the measuring is
evaluation.calibration.calibrate, the writing convert.write_calibration (atomic: the file is rewritten whole or
not at all).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from ..core.errors import InvalidOptionError
from ..evaluation.calibration import CalibrationConfig
from .flags import add_config_arguments, config_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CalibrationConfig)
    # How the result is shown, not what is measured: not a CalibrationConfig field.
    parser.add_argument(
        "--show", type=int, default=3, metavar="N",
        help="then continue N of the calibration prompts with the base alone and guided by the ARM at its "
        "recommended α, printed side by side (0: none; default: %(default)s)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> None:
    from ..convert import write_calibration
    from ..evaluation.calibration import BUILTIN_PROMPTS, calibrate, curve_lines, read_prompts, subset
    from ..evaluation.showcase import sample_lines, show
    from .flags import note

    if args.show < 0:
        raise InvalidOptionError(f"--show must be ≥ 0, got {args.show}")
    config = CalibrationConfig(**config_options(CalibrationConfig, args))
    calibration = calibrate(config, progress=note if sys.stderr.isatty() else None)
    print("\n".join(curve_lines(calibration)))
    if config.write:
        from ..core.config import resolve_arm_path

        path = write_calibration(resolve_arm_path(config.arm), calibration)
        print(f"wrote the calibration into {path}")
    if args.show:
        # the first of the prompts calibrate() measured on
        prompts = read_prompts(config.prompts) if config.prompts else list(BUILTIN_PROMPTS)
        prompts = subset(prompts, config.samples, config.seed)[: args.show]
        alpha = calibration.recommended_alpha
        samples = show(config.base, config.arm, alpha, prompts, seed=config.seed, n_threads=config.n_threads)
        print(f"\ncalibration prompts, continued by the base and by the ARM at its recommended α {alpha:.3g}:")
        print("\n".join(sample_lines(samples, alpha, min(shutil.get_terminal_size((100, 20)).columns, 120))))
