"""`genarm-local quantize`: re-quantize an F32/F16/BF16 GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

import argparse

from ..convert import QUANT_TYPES, quantize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="F32, F16 or BF16 GGUF model")
    parser.add_argument("output", help="output GGUF path")
    parser.add_argument("--type", default="q4_k_m", help=f"target type: {', '.join(QUANT_TYPES)}")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument(
        "--allow-requantize", action="store_true", help="accept an already-quantized input (loses quality)"
    )


def main(args: argparse.Namespace) -> None:
    out = quantize(**vars(args))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
