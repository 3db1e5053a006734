"""`genarm-local train`: an ARM (a LoRA adapter over the base) from preference pairs with the GenARM loss.

    genarm-local train --model SRC --data PREFS.jsonl -o OUT_DIR [--export arm.gguf]

The flags are generated from TrainConfig's fields (genarm_local/train/config.py); the work is train.trainer.train.
"""

from __future__ import annotations

import argparse

from ..train.config import TrainConfig
from .flags import add_config_arguments, config_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> None:
    from ..train.trainer import train

    result = train(TrainConfig(**config_options(TrainConfig, args)))
    print("\n".join(report(result)))


def report(result) -> list[str]:
    """The one-screen end of `train`: what was trained, how well it separates held-out pairs, how far it moves the
    base (the calibration curve) and the weight to use, with warnings about extreme ARMs."""
    from ..evaluation.calibration import curve_lines

    lines = [f"trained {result.steps} steps on {result.train_pairs} pairs in {result.seconds:.0f} s"]
    if result.eval:
        lines.append(
            f"held out {result.eval_pairs} pairs: accuracy {result.eval['accuracy']:.3f}, margin β·Δ "
            f"{result.eval['margin']:.3f} (chosen {result.eval['chosen_logp']:.1f} vs rejected "
            f"{result.eval['rejected_logp']:.1f} nats), loss {result.eval['loss']:.4f}"
        )
    lines.append(
        f"wrote {result.output} (PEFT adapter), {result.log}" + (f", {result.export}" if result.export else "")
    )
    if result.calibration is not None:
        lines.append(f"calibration of {result.export.name} (KL(guided_α ‖ base) per token, training prompts):")
        lines += curve_lines(result.calibration)
        lines.append(
            f"use it as --arm {result.export} (its recommended α {result.calibration.recommended_alpha:.3g}) or "
            f"--arm {result.export}:ALPHA"
        )
    lines += [f"warning: {note}" for note in result.notes]
    return lines
