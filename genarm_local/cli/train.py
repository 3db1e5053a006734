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
    summary = f"{result.steps} steps on {result.train_pairs} pairs"
    if result.eval:
        summary += (
            f"; held out {result.eval_pairs}: accuracy {result.eval['accuracy']:.3f}, loss {result.eval['loss']:.4f}, "
            f"margin {result.eval['margin']:.3f}"
        )
    print(f"trained {summary} ({result.seconds:.0f} s)")
    print(f"wrote {result.output} (PEFT adapter), {result.log}" + (f", {result.export}" if result.export else ""))
