"""`genarm-local quantize`: re-quantize an F32/F16/BF16 GGUF with llama.cpp's own quantizer."""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import gguf

from genarm_local.atomic import atomic_output
from genarm_local.errors import CorruptModelError, InvalidOptionError, NotACheckpointError

QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
_FLOAT_TENSORS = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


def parse_type(name: str) -> gguf.LlamaFileType:
    try:
        return QUANT_TYPES[name.lower()]
    except KeyError:
        raise InvalidOptionError(f"unknown type {name!r}; choose one of {', '.join(QUANT_TYPES)}") from None


def inspect_input(path: Path) -> gguf.GGUFReader:
    """Read the whole header and tensor table: a truncated or corrupt file fails here, before llama.cpp sees it."""
    from genarm_local.native import check_gguf_path

    check_gguf_path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on bad bytes
        raise CorruptModelError(f"{path} is truncated or corrupt: {exc}") from exc
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        raise NotACheckpointError(f"{path} is a LoRA adapter, not a model; adapters are not quantized")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise CorruptModelError(f"{path} is truncated: tensor data ends at {end} bytes, file has {path.stat().st_size}")
    return reader


def run_quantizer(src: Path, dst: Path, file_type: gguf.LlamaFileType, allow_requantize: bool = False) -> None:
    """llama_model_quantize from ``src`` to ``dst`` (both complete paths; no checks, no renames)."""
    import llama_cpp as lc

    from genarm_local.native import backend_init, last_native_error

    backend_init()
    params = lc.llama_model_quantize_default_params()  # a zeroed struct would mean F32 output/embedding types
    params.ftype = int(file_type)
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise CorruptModelError(f"llama.cpp could not quantize {src}: {last_native_error()}")


def test_load(path: Path) -> None:
    """The quantizer does not read the vocabulary; only a real load proves the file is usable."""
    from genarm_local.native import Model

    Model(path).close()


def quantize(
    input: str | os.PathLike,
    output: str | os.PathLike,
    type: str = "q4_k_m",
    force: bool = False,
    allow_requantize: bool = False,
) -> Path:
    """Quantize a float GGUF model to ``type``; the output appears only once it is complete and loads."""
    src, file_type = Path(input), parse_type(type)
    reader = inspect_input(src)
    quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in _FLOAT_TENSORS})
    if quantized and not allow_requantize:
        raise InvalidOptionError(
            f"{src} is already quantized ({', '.join(quantized)}); quantizing again loses quality — convert from "
            "the original checkpoint, or pass --allow-requantize"
        )
    del reader  # release the memory map before llama.cpp opens the file
    with atomic_output(output, force) as tmp:
        run_quantizer(src, tmp, file_type, allow_requantize)
        test_load(tmp)
    return Path(output)


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
