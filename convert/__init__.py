"""Converters: HF checkpoints (+ PEFT LoRA) to GGUF, adapters to GGUF LoRA, quantization with llama.cpp.

Installed as ``genarm_local.convert``. Importing this package is cheap; torch and transformers are imported only
by the functions that need them (the ``train`` extra). The names below are the public interface, also what
training uses to export the model it holds in memory.
"""

from .architectures import architecture_for
from .checkpoint import checkpoint_from_model, gguf_architecture, load_transformers_model, read_adapter, read_config
from .convert import FLOAT_TYPES, convert, test_load_adapter
from .export import export_adapter, export_model
from .metadata import rewrite_metadata, write_calibration
from .quantize import QUANT_TYPES, quantize, run_quantizer, test_load

__all__ = [
    "FLOAT_TYPES",
    "QUANT_TYPES",
    "architecture_for",
    "checkpoint_from_model",
    "convert",
    "export_adapter",
    "export_model",
    "gguf_architecture",
    "load_transformers_model",
    "quantize",
    "read_adapter",
    "read_config",
    "rewrite_metadata",
    "run_quantizer",
    "test_load",
    "test_load_adapter",
    "write_calibration",
]
