"""Converters: HF checkpoints (+ PEFT LoRA) to GGUF, adapters to GGUF LoRA, quantization with llama.cpp.

Installed as ``genarm_local.convert``. Importing this package is cheap; torch and transformers are imported only
by the functions that need them (the ``train`` extra).
"""

from .convert import convert
from .quantize import quantize

__all__ = ["convert", "quantize"]
