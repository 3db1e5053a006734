"""`genarm-local convert`: HF checkpoint or GGUF (+ PEFT LoRA) → GGUF model or GGUF LoRA adapter."""

from __future__ import annotations

import argparse

from ..convert import QUANT_TYPES, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Hugging Face checkpoint directory, or a GGUF file (loaded dequantized)")
    parser.add_argument("-o", "--output", required=True, help="output .gguf path")
    parser.add_argument("--outtype", default="f16", help=f"output type: {', '.join(QUANT_TYPES)}")
    parser.add_argument("--lora", metavar="ADAPTER_DIR", help="PEFT LoRA adapter to merge into the weights")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="with --lora: write the adapter itself as a GGUF LoRA adapter for the base (one copy of the weights "
        "in memory at run time)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    out = convert(**vars(args))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
