"""`genarm-local train`: an ARM (a LoRA adapter over the base) from preference pairs with the GenARM loss.

    genarm-local train --model SRC --data PREFS.jsonl -o OUT_DIR [--export arm.gguf]

The flags are generated from TrainConfig's fields (genarm_local/train/config.py); the work is train.trainer.train.
"""

from __future__ import annotations

import argparse
import shutil

from ..train.config import TrainConfig
from .flags import add_config_arguments, config_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> None:
    from ..train.trainer import train

    result = train(TrainConfig(**config_options(TrainConfig, args)))
    print("\n".join(report(result, width=min(shutil.get_terminal_size((100, 20)).columns, 120))))


def report(result, width: int = 100) -> list[str]:
    """The end of `train`: what was trained, which step's weights were kept and why, how well they separate
    held-out pairs, how far they move the base (the calibration curve) and the weight to use, a warning about a weak
    ARM, then a few held-out prompts continued by the base and guided at that weight."""
    from ..evaluation.calibration import curve_lines
    from ..evaluation.showcase import sample_lines
    from ..train.selection import summary

    stopped = f" (of {result.total_steps}: stopped early)" if result.stopped_early else ""
    lines = [f"trained {result.steps} steps{stopped} on {result.train_pairs} pairs in {result.seconds:.0f} s"]
    lines += summary(
        result.evaluations, result.selected_step, result.steps, result.total_steps, result.select, result.stopped_early
    )
    if result.eval:
        lines.append(
            f"held out {result.eval_pairs} pairs, at step {result.selected_step}: accuracy "
            f"{result.eval['accuracy']:.3f}, margin β·Δ {result.eval['margin']:.3f} (chosen "
            f"{result.eval['chosen_logp']:.1f} vs rejected {result.eval['rejected_logp']:.1f} nats), loss "
            f"{result.eval['loss']:.4f}"
        )
    lines.append(
        f"wrote {result.output} (PEFT adapter), {result.log}" + (f", {result.export}" if result.export else "")
    )
    where = "held-out" if result.eval_pairs else "training"  # the prompts calibration and the samples use
    if result.calibration is not None:
        lines.append(f"calibration of {result.export.name} (guided text against the base's, {where} prompts):")
        lines += curve_lines(result.calibration)
        lines.append(
            f"use it as --arm {result.export} (its recommended α {result.calibration.recommended_alpha:.3g}) or "
            f"--arm {result.export}:ALPHA"
        )
    lines += [f"warning: {note}" for note in result.notes]
    if result.samples:
        alpha = result.calibration.recommended_alpha
        accuracy = f"; held-out accuracy {result.eval['accuracy']:.2f}" if result.eval else ""
        lines += ["", f"{where} prompts, continued by the base and by the ARM at α {alpha:.3g}{accuracy}:"]
        lines += sample_lines(result.samples, alpha, width)
    return lines
